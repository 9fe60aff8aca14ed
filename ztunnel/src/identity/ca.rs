//! The local CA.
//!
//! `--ca-dir` takes Istio's plug-in CA layout, so the files Istio's own
//! tooling makes work unchanged:
//! - `ca-cert.pem`: the certificate that signs workload certificates;
//! - `ca-key.pem`: its key (RSA or ECDSA; PKCS#1, SEC1 or PKCS#8 PEM);
//! - `root-cert.pem`: the trust anchor(s);
//! - `cert-chain.pem`: the chain from `ca-cert.pem` up to the root.
//!
//! Without `--ca-dir`, a development root is generated once, written in that
//! layout under the state directory, and reused on later starts, so several
//! nodes pointed at the same directory share one root.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{Identity, IdentityError};

/// Allowed clock skew between nodes: certificates start this long ago.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a generated development root.
const DEV_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The CA files, by their names in Istio's plug-in layout.
pub mod files {
    pub const CA_CERT: &str = "ca-cert.pem";
    pub const CA_KEY: &str = "ca-key.pem";
    pub const ROOT_CERT: &str = "root-cert.pem";
    pub const CERT_CHAIN: &str = "cert-chain.pem";
}

/// A CA that issues workload certificates.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after a workload's leaf: `ca-cert.pem` and the rest
    /// of `cert-chain.pem`, roots excluded.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

/// A workload certificate with its key.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The trust anchors peers' certificates must chain to, as the issuing
    /// CA gave them with this certificate: a new trust bundle arrives with
    /// the next certificate, no restart needed.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial, for logs.
    pub serial: String,
}

impl WorkloadCert {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

fn read(dir: &Path, name: &str) -> Result<(PathBuf, String), IdentityError> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| IdentityError::CaFile {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok((path, text))
}

fn certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::CaFile {
            path: path.to_path_buf(),
            message: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::CaFile {
            path: path.to_path_buf(),
            message: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

impl LocalCa {
    /// Loads a CA from Istio's plug-in layout in `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let (cert_path, cert_pem) = read(dir, files::CA_CERT)?;
        let (key_path, key_pem) = read(dir, files::CA_KEY)?;
        let (root_path, root_pem) = read(dir, files::ROOT_CERT)?;
        let roots = certs(&root_path, &root_pem)?;
        // cert-chain.pem is optional when ca-cert.pem is itself the root.
        let chain = match read(dir, files::CERT_CHAIN) {
            Ok((chain_path, chain_pem)) => certs(&chain_path, &chain_pem)?,
            Err(_) => certs(&cert_path, &cert_pem)?,
        };
        let ca_cert = certs(&cert_path, &cert_pem)?.remove(0);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::CaFile {
            path: key_path.clone(),
            message: format!("not a usable RSA or ECDSA private key: {e}"),
        })?;
        let issuer =
            Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| IdentityError::CaFile {
                path: cert_path.clone(),
                message: format!(
                    "not a usable CA certificate (or it does not match {}): {e}",
                    key_path.display()
                ),
            })?;
        let mut intermediates = vec![ca_cert.clone()];
        for cert in chain {
            if cert != ca_cert && !roots.contains(&cert) {
                intermediates.push(cert);
            }
        }
        intermediates.retain(|c| !roots.contains(c));
        Ok(LocalCa {
            issuer,
            intermediates,
            roots,
        })
    }

    /// Loads the development CA kept in `state_dir/ca`, generating it first
    /// if it does not exist. Returns the CA and its directory.
    pub fn load_or_generate_dev(state_dir: &Path) -> Result<(Self, PathBuf), IdentityError> {
        let dir = state_dir.join("ca");
        if !dir.join(files::CA_KEY).exists() {
            generate_dev_root(&dir)?;
        }
        Ok((Self::load(&dir)?, dir))
    }

    /// The trust anchors.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Issues a certificate for `identity`, valid for `ttl`, with a fresh
    /// ECDSA P-256 key.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let err = |message: String| IdentityError::Issue {
            identity: identity.to_string(),
            message,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let signed = self.sign(identity, &key, ttl)?;
        let mut chain = vec![signed.leaf];
        chain.extend(self.intermediates.iter().cloned());
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: self.roots.clone(),
            not_before: signed.not_before,
            not_after: signed.not_after,
            serial: signed.serial,
        })
    }

    /// Signs a PKCS#10 request (PEM) for a workload, as a CA service does:
    /// only the request's key and its single SPIFFE id are taken from it,
    /// and `authorize` decides on the id before anything is signed. Returns
    /// the identity and the chain to send back as istiod sends it: the leaf
    /// and each intermediate as a PEM element, then every root together in
    /// the last element.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        ttl: Duration,
        authorize: impl FnOnce(&Identity) -> Result<(), IdentityError>,
    ) -> Result<(Identity, Vec<String>), IdentityError> {
        let bad = |message: String| IdentityError::Issue {
            identity: "(unknown)".into(),
            message,
        };
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| bad(format!("not a valid, signed certificate request: {e}")))?;
        let ids: Vec<&SanType> = csr.params.subject_alt_names.iter().collect();
        let identity: Identity = match ids.as_slice() {
            [SanType::URI(uri)] => uri.as_str().parse()?,
            _ => {
                return Err(bad(
                    "the request must name exactly one SPIFFE id (a URI SAN) and nothing else"
                        .into(),
                ))
            }
        };
        authorize(&identity)?;
        let signed = self.sign(&identity, &csr.public_key, ttl)?;
        let mut chain = vec![pem_cert(&signed.leaf)];
        chain.extend(self.intermediates.iter().map(pem_cert));
        chain.push(self.roots.iter().map(pem_cert).collect());
        Ok((identity, chain))
    }

    /// A serving certificate for a control plane reachable as `names` (DNS
    /// names or IP addresses), with its key: PEM chain (leaf and
    /// intermediates) and PEM key.
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), IdentityError> {
        let err = |message: String| IdentityError::Issue {
            identity: names.join(","),
            message,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| err(e.to_string()))?;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        let mut chain = cert.pem();
        for c in &self.intermediates {
            chain.push_str(&pem_cert(c));
        }
        Ok((chain, key.serialize_pem()))
    }

    /// Signs a workload certificate for `identity` over `public_key`.
    fn sign(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<Signed, IdentityError> {
        let err = |message: String| IdentityError::Issue {
            identity: identity.to_string(),
            message,
        };
        let mut params = CertificateParams::default();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| err(format!("SAN: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        // Istio's workload certificates carry no subject; the SAN is the identity.
        params.distinguished_name = DistinguishedName::new();
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial: [u8; 16] = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        Ok(Signed {
            leaf: cert.der().clone(),
            not_before,
            not_after,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// A freshly signed leaf.
struct Signed {
    leaf: CertificateDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

/// A certificate in PEM.
pub fn pem_cert(cert: &CertificateDer<'_>) -> String {
    use std::fmt::Write;
    const LINE: usize = 64;
    let b64 = base64_encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(LINE) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(chunk));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    // A key's random bytes are as good a source as any; avoid another RNG crate.
    let _ = rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut serial);
    // Positive and non-zero, as RFC 5280 wants.
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    serial
}

/// Writes a self-signed ECDSA P-256 root in Istio's plug-in layout.
pub fn generate_dev_root(dir: &Path) -> Result<(), IdentityError> {
    let err = |message: String| IdentityError::StateDir {
        path: dir.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ztunnel");
    dn.push(DnType::CommonName, "ztunnel development root");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + DEV_ROOT_LIFETIME).into();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let cert = params.self_signed(&key).map_err(|e| err(e.to_string()))?;
    // The key last, written atomically: its presence marks the CA complete.
    for name in [files::CA_CERT, files::ROOT_CERT, files::CERT_CHAIN] {
        std::fs::write(dir.join(name), cert.pem()).map_err(|e| err(e.to_string()))?;
    }
    write_private(&dir.join(files::CA_KEY), &key.serialize_pem())
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}
