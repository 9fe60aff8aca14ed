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
    grpc::ControlPlaneEndpoint,
    protos::istio::v1::auth::{
        istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
    },
};

/// The metadata key that names the workload a node proxy asks for.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Asks the control plane's CA for workload certificates.
pub struct CaClient {
    endpoint: ControlPlaneEndpoint,
}

impl CaClient {
    pub fn new(endpoint: ControlPlaneEndpoint) -> Self {
        CaClient { endpoint }
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
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| err(format!("SAN: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| err(format!("building the CSR: {e}")))?;
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
        let channel = self.endpoint.channel().map_err(|e| err(e.to_string()))?;
        let response = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
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

/// Checks the CA's answer and makes it a workload certificate: the leaf
/// must carry exactly the identity asked for and our key; the last
/// certificate is the trust root.
fn certificate(
    identity: &Identity,
    key: &KeyPair,
    pems: &[String],
) -> Result<WorkloadCert, String> {
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    for (i, pem) in pems.iter().enumerate() {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|e| format!("cert_chain[{i}] is not PEM: {e}"))?);
        }
    }
    let too_few = |n: usize| {
        format!("the CA sent {n} certificate(s); a leaf and at least the root are needed")
    };
    let root = certs.pop().ok_or_else(|| too_few(0))?;
    if certs.is_empty() {
        return Err(too_few(1));
    }
    let roots = vec![root];
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
