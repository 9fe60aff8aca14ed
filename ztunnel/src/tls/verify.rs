//! Peer certificate checks: the chain must lead to our trust root, and the
//! leaf must name a SPIFFE identity: in our trust domain (server checking a
//! client), or one of the identities we expected (client checking a server).

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::identity::Identity;

/// The SPIFFE ids in a certificate's URI SANs.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<Identity> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect()
}

/// When a certificate expires; `None` if it cannot be read.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

// Debug prints the message: rustls shows the cause of a certificate error
// with `{:?}`, and that is what ends up in the log line naming the peer.
#[derive(thiserror::Error)]
enum SpiffeError {
    #[error("peer certificate names no SPIFFE identity")]
    NoIdentity,
    #[error("peer identity {got} is outside trust domain {want}")]
    WrongTrustDomain { got: String, want: String },
    #[error("peer identity {got} is not the expected {want}")]
    Unexpected { got: String, want: String },
}

impl std::fmt::Debug for SpiffeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn reject(e: SpiffeError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Server side: a client certificate is required, must chain to the root
/// and must name an identity in our trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(roots, super::provider()).build()?;
        Ok(SpiffeClientVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: they leak the CA's name and clients have one cert anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let ids = spiffe_ids(end_entity);
        let Some(first) = ids.first() else {
            return Err(reject(SpiffeError::NoIdentity));
        };
        // Any SPIFFE SAN in our trust domain will do, as Istio's ztunnel.
        if !ids.iter().any(|id| *id.trust_domain == *self.trust_domain) {
            return Err(reject(SpiffeError::WrongTrustDomain {
                got: first.to_string(),
                want: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server certificate must chain to the root and name one
/// of the identities the destination is expected to have. The TLS server
/// name is not used: SPIFFE identities, not DNS names, are what is checked.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: Vec<Identity>) -> Self {
        SpiffeServerVerifier {
            roots,
            expected,
            algs: super::provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let ids = spiffe_ids(end_entity);
        if ids.is_empty() {
            return Err(reject(SpiffeError::NoIdentity));
        }
        if !ids.iter().any(|id| self.expected.contains(id)) {
            let want = self
                .expected
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(reject(SpiffeError::Unexpected {
                got: ids[0].to_string(),
                want,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    };

    use super::*;

    /// A CA made in memory, issuing leaves with whatever SANs a test needs.
    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        root: CertificateDer<'static>,
    }

    impl TestCa {
        fn new() -> Self {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let root = params.self_signed(&key).unwrap().der().clone();
            TestCa {
                issuer: Issuer::new(params, key),
                root,
            }
        }

        fn roots(&self) -> Arc<RootCertStore> {
            let mut store = RootCertStore::empty();
            store.add(self.root.clone()).unwrap();
            Arc::new(store)
        }

        /// A workload leaf naming `sans` (URI SANs unless they look like DNS names).
        fn leaf(&self, sans: &[&str]) -> CertificateDer<'static> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans.iter().map(|s| san(s)).collect();
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.signed_by(&key, &self.issuer).unwrap().der().clone()
        }
    }

    fn san(s: &str) -> SanType {
        let ia5 = s.to_string().try_into().unwrap();
        if s.contains(':') {
            SanType::URI(ia5)
        } else {
            SanType::DnsName(ia5)
        }
    }

    fn id(td: &str, sa: &str) -> Identity {
        Identity::new(td, "default", sa)
    }

    fn client_verdict(
        ca: &TestCa,
        trust_domain: &str,
        leaf: &CertificateDer<'_>,
    ) -> Result<(), String> {
        SpiffeClientVerifier::new(ca.roots(), trust_domain)
            .unwrap()
            .verify_client_cert(leaf, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn server_verdict(
        ca: &TestCa,
        expected: Vec<Identity>,
        leaf: &CertificateDer<'_>,
    ) -> Result<(), String> {
        let name = ServerName::try_from("ignored.example").unwrap();
        SpiffeServerVerifier::new(ca.roots(), expected)
            .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn spiffe_ids_are_the_valid_spiffe_uri_sans_in_order() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&[
            "workload.example",
            "spiffe://a.td/ns/default/sa/x",
            "https://a.td/ns/default/sa/y",
            "spiffe://a.td/ns/default",
            "spiffe://b.td/ns/default/sa/z",
        ]);
        assert_eq!(spiffe_ids(&leaf), vec![id("a.td", "x"), id("b.td", "z")]);
    }

    #[test]
    fn spiffe_ids_of_a_certificate_without_uri_sans_is_empty() {
        let ca = TestCa::new();
        assert!(spiffe_ids(&ca.leaf(&["only.dns.example"])).is_empty());
        assert!(spiffe_ids(&ca.leaf(&[])).is_empty());
        // A CA certificate has no SAN extension at all.
        assert!(spiffe_ids(&ca.root).is_empty());
    }

    #[test]
    fn spiffe_ids_of_garbage_or_truncated_der_is_empty() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["spiffe://td/ns/default/sa/x"]);
        assert_eq!(spiffe_ids(&leaf).len(), 1);
        let der = leaf.as_ref();
        for cut in [0, 1, 10, der.len() / 2, der.len() - 1] {
            let truncated = CertificateDer::from(der[..cut].to_vec());
            assert!(spiffe_ids(&truncated).is_empty(), "cut at {cut}");
            assert!(not_after(&truncated).is_none(), "cut at {cut}");
        }
        let garbage = CertificateDer::from(vec![0x30, 0x82, 0xff, 0xff, 0x00]);
        assert!(spiffe_ids(&garbage).is_empty());
    }

    #[test]
    fn not_after_is_the_certificate_expiry_to_the_second() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let expiry = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        params.not_after = expiry.into();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(not_after(cert.der()), Some(expiry));
        assert!(not_after(cert.der()).unwrap() > SystemTime::now());
    }

    #[test]
    fn a_client_in_our_trust_domain_is_accepted() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["spiffe://cluster.local/ns/default/sa/a"]);
        assert_eq!(client_verdict(&ca, "cluster.local", &leaf), Ok(()));
    }

    #[test]
    fn a_client_with_any_san_in_our_trust_domain_is_accepted() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&[
            "spiffe://other.td/ns/default/sa/a",
            "spiffe://cluster.local/ns/default/sa/a",
        ]);
        assert_eq!(client_verdict(&ca, "cluster.local", &leaf), Ok(()));
    }

    #[test]
    fn a_client_only_in_another_trust_domain_is_refused() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["spiffe://other.td/ns/default/sa/a"]);
        let e = client_verdict(&ca, "cluster.local", &leaf).unwrap_err();
        assert!(
            e.contains("spiffe://other.td/ns/default/sa/a is outside trust domain cluster.local"),
            "{e}"
        );
    }

    #[test]
    fn a_client_naming_no_spiffe_id_is_refused() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["client.example", "spiffe://cluster.local/ns/default"]);
        let e = client_verdict(&ca, "cluster.local", &leaf).unwrap_err();
        assert!(e.contains("names no SPIFFE identity"), "{e}");
    }

    #[test]
    fn a_client_from_another_ca_is_refused_whatever_it_names() {
        let (ours, theirs) = (TestCa::new(), TestCa::new());
        let leaf = theirs.leaf(&["spiffe://cluster.local/ns/default/sa/a"]);
        let e = client_verdict(&ours, "cluster.local", &leaf).unwrap_err();
        assert!(
            !e.contains("SPIFFE"),
            "refused for the chain, not the name: {e}"
        );
    }

    #[test]
    fn a_server_with_an_expected_identity_is_accepted() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["spiffe://cluster.local/ns/default/sa/b"]);
        let expected = vec![id("cluster.local", "a"), id("cluster.local", "b")];
        assert_eq!(server_verdict(&ca, expected, &leaf), Ok(()));
    }

    #[test]
    fn a_server_with_an_unexpected_identity_is_refused_naming_both() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["spiffe://cluster.local/ns/default/sa/c"]);
        let expected = vec![id("cluster.local", "a"), id("cluster.local", "b")];
        let e = server_verdict(&ca, expected, &leaf).unwrap_err();
        assert!(
            e.contains(
                "spiffe://cluster.local/ns/default/sa/c is not the expected \
                 spiffe://cluster.local/ns/default/sa/a or spiffe://cluster.local/ns/default/sa/b"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_server_matching_by_dns_name_only_is_refused() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["ignored.example"]);
        let e = server_verdict(&ca, vec![id("cluster.local", "a")], &leaf).unwrap_err();
        assert!(e.contains("names no SPIFFE identity"), "{e}");
    }

    #[test]
    fn a_server_from_another_ca_is_refused() {
        let (ours, theirs) = (TestCa::new(), TestCa::new());
        let leaf = theirs.leaf(&["spiffe://cluster.local/ns/default/sa/a"]);
        assert!(server_verdict(&ours, vec![id("cluster.local", "a")], &leaf).is_err());
    }
}
