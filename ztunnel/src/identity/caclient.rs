//! The client of Istio's certificate service
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`): a fresh
//! key and CSR per certificate, asked for on behalf of a workload this node
//! serves, as Istio's ztunnel does in its node-proxy role. The key never
//! leaves the node; the CA's key never reaches it.

use std::{collections::BTreeMap, time::Duration};

use prost_types::{value::Kind, Struct, Value};
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Identity, IdentityError, WorkloadCert};
use crate::{
    grpc::{AuthChannel, ControlPlaneEndpoint, GrpcError},
    protos::istio::v1::auth::{
        istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
    },
};

/// The metadata key that names the workload a node proxy asks for.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// How long one certificate request may take: a CA that accepts and then
/// says nothing must not hold an identity's request (and so its retries)
/// forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the control plane's CA for workload certificates.
pub struct CaClient {
    endpoint: ControlPlaneEndpoint,
    /// One connection for every request, as long as the root file holds
    /// what it was made with (a rotated root makes a new one).
    channel: std::sync::Mutex<Option<(Vec<u8>, AuthChannel)>>,
}

impl CaClient {
    pub fn new(endpoint: ControlPlaneEndpoint) -> Self {
        CaClient {
            endpoint,
            channel: std::sync::Mutex::new(None),
        }
    }

    fn channel(&self) -> Result<AuthChannel, GrpcError> {
        let root = std::fs::read(&self.endpoint.root_cert).map_err(|e| GrpcError::Root {
            path: self.endpoint.root_cert.clone(),
            message: e.to_string(),
        })?;
        let mut cached = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made_with, channel)) = cached.as_ref() {
            if *made_with == root {
                return Ok(channel.clone());
            }
        }
        let channel = self.endpoint.channel()?;
        *cached = Some((root, channel.clone()));
        Ok(channel)
    }

    pub fn address(&self) -> &str {
        &self.endpoint.address
    }

    /// A certificate for `identity`, valid for `ttl` if the CA agrees.
    pub async fn fetch(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        let err = |message: String| IdentityError::Issue {
            identity: identity.to_string(),
            message,
        };
        let (key, csr) = csr(identity).map_err(err)?;
        let request = IstioCertificateRequest {
            csr,
            validity_duration: ttl.as_secs() as i64,
            metadata: Some(Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(identity.to_string())),
                    },
                )]),
            }),
        };
        let channel = self.channel().map_err(|e| err(e.to_string()))?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let call = client.create_certificate(request);
        let response = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| {
                err(format!(
                    "the CA at {} did not answer within {REQUEST_TIMEOUT:?}",
                    self.endpoint.address
                ))
            })?
            .map_err(|status| {
                err(format!(
                    "the CA at {}: {}",
                    self.endpoint.address,
                    crate::grpc::describe(&status, "CA_ROOT_CA", "ALT_CA_HOSTNAME")
                ))
            })?
            .into_inner();
        certificate(identity, &key, &response.cert_chain).map_err(err)
    }
}

/// A fresh key, and a CSR for `identity` signed with it (PEM).
fn csr(identity: &Identity) -> Result<(KeyPair, String), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e| format!("SAN: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| format!("building the CSR: {e}"))?;
    Ok((key, csr))
}

/// Checks the CA's answer and makes it a workload certificate. As istiod
/// sends it, `cert_chain` is the leaf, then any intermediates, then the
/// trust bundle as its last element (several roots while a root rotates);
/// a single element is read as one PEM run ending with the root. The leaf
/// must carry exactly the identity asked for and our key, be valid now, and
/// chain to those roots.
fn certificate(
    identity: &Identity,
    key: &KeyPair,
    pems: &[String],
) -> Result<WorkloadCert, String> {
    let parse = |i: usize| {
        CertificateDer::pem_slice_iter(pems[i].as_bytes())
            .map(|c| c.map_err(|e| format!("cert_chain[{i}] is not PEM: {e}")))
            .collect::<Result<Vec<CertificateDer<'static>>, String>>()
    };
    let (certs, roots) = match pems.len() {
        0 => return Err("the CA sent no certificate".into()),
        1 => {
            let mut all = parse(0)?;
            let root = all.pop();
            (all, root.into_iter().collect::<Vec<_>>())
        }
        n => {
            let mut chain = Vec::new();
            for i in 0..n - 1 {
                chain.extend(parse(i)?);
            }
            (chain, parse(n - 1)?)
        }
    };
    if certs.is_empty() || roots.is_empty() {
        return Err(format!(
            "the CA sent {} certificate(s) and {} root(s); a leaf and at least one root are needed",
            certs.len(),
            roots.len()
        ));
    }
    verify_chain(&certs, &roots)?;
    let (_, leaf) = X509Certificate::from_der(&certs[0])
        .map_err(|e| format!("the leaf is not a certificate: {e}"))?;
    if leaf.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err("the leaf does not carry the key of the request".into());
    }
    let ids = crate::tls::spiffe_ids(&certs[0]);
    if ids.as_slice() != std::slice::from_ref(identity) {
        return Err(format!(
            "the leaf is for {:?}, not for {identity}",
            ids.iter().map(ToString::to_string).collect::<Vec<_>>()
        ));
    }
    let validity = leaf.validity();
    let to_time = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok(WorkloadCert {
        identity: identity.clone(),
        serial: leaf
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_before: to_time(validity.not_before),
        not_after: to_time(validity.not_after),
        chain: certs,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        roots,
    })
}

/// The leaf (`chain[0]`, with `chain[1..]` as intermediates) must chain to
/// one of `roots`, be valid now and allowed for client authentication, as
/// every peer will check it.
fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    let mut store = rustls::RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        store
            .add(root.clone())
            .map_err(|e| format!("root {i} of the trust bundle: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(store),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| format!("the trust bundle: {e}"))?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
        .map_err(|e| format!("the leaf does not verify against the CA's own roots: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    /// A CA of its own, in a directory removed on drop.
    struct TestCa {
        ca: LocalCa,
        dir: std::path::PathBuf,
    }

    impl TestCa {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "ztunnel-caclient-{name}-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            crate::identity::ca::generate_dev_root(&dir).expect("a CA");
            TestCa {
                ca: LocalCa::load(&dir).expect("the CA loads"),
                dir,
            }
        }

        /// What the CA answers to a CSR for `identity`, with the request's key.
        fn answer(&self, identity: &Identity) -> (KeyPair, Vec<String>) {
            let (key, csr) = csr(identity).expect("a CSR");
            let (_, chain) = self
                .ca
                .sign_csr(&csr, Duration::from_secs(3600), |_| Ok(()))
                .expect("signed");
            (key, chain)
        }
    }

    impl Drop for TestCa {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa)
    }

    #[test]
    fn an_answer_as_istiod_sends_it_is_accepted() {
        let ca = TestCa::new("good");
        let (key, chain) = ca.answer(&id("a"));
        let cert = certificate(&id("a"), &key, &chain).expect("accepted");
        assert_eq!(cert.identity, id("a"));
        assert_eq!(cert.roots.len(), 1);
        assert!(cert.not_after > std::time::SystemTime::now());
    }

    #[test]
    fn every_root_of_the_bundle_is_trusted() {
        let (ca, other) = (TestCa::new("rot-a"), TestCa::new("rot-b"));
        let (key, mut chain) = ca.answer(&id("a"));
        let (_, other_chain) = other.answer(&id("a"));
        // A root rotation: the bundle holds the new root and the old.
        let bundle = format!("{}{}", other_chain.last().unwrap(), chain.last().unwrap());
        *chain.last_mut().unwrap() = bundle;
        let cert = certificate(&id("a"), &key, &chain).expect("accepted");
        assert_eq!(cert.roots.len(), 2);
        assert_eq!(cert.chain.len(), chain.len() - 1);
    }

    #[test]
    fn a_leaf_for_another_identity_is_refused() {
        let ca = TestCa::new("other-id");
        let (key, chain) = ca.answer(&id("b"));
        let e = certificate(&id("a"), &key, &chain).unwrap_err();
        assert!(e.contains("not for"), "{e}");
    }

    #[test]
    fn a_leaf_with_another_key_is_refused() {
        let ca = TestCa::new("other-key");
        let (_, chain) = ca.answer(&id("a"));
        let (other_key, _) = csr(&id("a")).unwrap();
        let e = certificate(&id("a"), &other_key, &chain).unwrap_err();
        assert!(e.contains("key"), "{e}");
    }

    #[test]
    fn a_leaf_that_does_not_chain_to_the_roots_sent_is_refused() {
        let (ca, foreign) = (TestCa::new("chain-a"), TestCa::new("chain-b"));
        let (key, mut chain) = ca.answer(&id("a"));
        let (_, foreign_chain) = foreign.answer(&id("a"));
        *chain.last_mut().unwrap() = foreign_chain.last().unwrap().clone();
        let e = certificate(&id("a"), &key, &chain).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
    }

    #[test]
    fn an_answer_without_a_leaf_or_a_root_is_refused() {
        let ca = TestCa::new("short");
        let (key, chain) = ca.answer(&id("a"));
        let root_only = vec![chain.last().unwrap().clone()];
        assert!(certificate(&id("a"), &key, &root_only).is_err());
        assert!(certificate(&id("a"), &key, &[]).is_err());
        assert!(certificate(&id("a"), &key, &["not PEM".into(), "x".into()]).is_err());
    }
}
