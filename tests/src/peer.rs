//! A hand-driven HBONE peer, for tests that play a client ztunnel would never
//! be: wrong roots, wrong trust domains, no certificate, bad CONNECTs.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use ztunnel::identity::WorkloadCert;

use crate::netns::Netns;

/// Accepts any server certificate: these tests judge the server's verdict
/// on *us*, not ours on it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client configuration presenting `cert` (or nothing), ALPN h2.
pub fn client_config(cert: Option<&WorkloadCert>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some(cert) => builder.with_client_auth_cert(
            cert.chain.clone(),
            PrivateKeyDer::Pkcs8(cert.key.clone_key()),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a hand-driven HBONE attempt got.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The TLS session failed or the server closed it before HTTP/2 worked.
    Refused(String),
    /// The CONNECT got this status.
    Status(u16),
}

/// From inside `ns`, opens TLS to `server` (its 15008) with `cert`, then
/// sends CONNECT `authority`.
pub fn connect(
    ns: &Netns,
    server: SocketAddr,
    cert: Option<&WorkloadCert>,
    authority: &str,
) -> Result<Outcome> {
    let config = client_config(cert)?;
    let tcp = ns
        .run(move || std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5)))?
        .context("TCP connect to 15008")?;
    tcp.set_nonblocking(true)?;
    let authority = authority.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let attempt = async {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(server.ip().into()), tcp)
                .await
                .map_err(|e| Refusal(format!("TLS: {e}")))?;
            let (send, connection) = h2::client::handshake(tls)
                .await
                .map_err(|e| Refusal(format!("HTTP/2: {e}")))?;
            tokio::spawn(connection);
            let mut send = send
                .ready()
                .await
                .map_err(|e| Refusal(format!("HTTP/2: {e}")))?;
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority)
                .body(())
                .context("request")?;
            let (response, _stream) = send
                .send_request(request, false)
                .map_err(|e| Refusal(format!("HTTP/2: {e}")))?;
            let response = response
                .await
                .map_err(|e| Refusal(format!("HTTP/2: {e}")))?;
            anyhow::Ok(Outcome::Status(response.status().as_u16()))
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => match e.downcast::<Refusal>() {
                Ok(Refusal(reason)) => Ok(Outcome::Refused(reason)),
                Err(e) => Err(e),
            },
            Err(_) => anyhow::bail!("no verdict within 10s"),
        }
    })
}

#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// HBONE connections held open from a namespace with one certificate, with
/// no stream on them: what a peer hoarding connections looks like.
pub struct Held {
    opened: usize,
    closed: Arc<std::sync::atomic::AtomicUsize>,
    // Drives the connections; dropping it closes them.
    _runtime: tokio::runtime::Runtime,
}

impl Held {
    /// From inside `ns`, opens `n` connections to `server` (its 15008)
    /// presenting `cert`, each through its TLS and HTTP/2 handshakes.
    pub fn open(ns: &Netns, server: SocketAddr, cert: &WorkloadCert, n: usize) -> Result<Self> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let config = client_config(Some(cert))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let closed = Arc::new(AtomicUsize::new(0));
        for i in 0..n {
            let tcp = ns
                .run(move || std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5)))?
                .with_context(|| format!("TCP connect {i} to 15008"))?;
            tcp.set_nonblocking(true)?;
            let config = config.clone();
            let driver = runtime.block_on(async move {
                let tcp = tokio::net::TcpStream::from_std(tcp)?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(ServerName::IpAddress(server.ip().into()), tcp)
                    .await
                    .with_context(|| format!("TLS {i}"))?;
                let (send, connection) = h2::client::handshake(tls)
                    .await
                    .with_context(|| format!("HTTP/2 {i}"))?;
                anyhow::Ok((send, connection))
            })?;
            let closed = closed.clone();
            runtime.spawn(async move {
                let (_send, connection) = driver;
                let _ = connection.await;
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
        Ok(Held {
            opened: n,
            closed,
            _runtime: runtime,
        })
    }

    /// How many the server has closed so far.
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits up to `timeout` for at least `n` to be closed; how many are.
    pub fn wait_closed(&self, n: usize, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        while self.closed() < n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.closed()
    }

    pub fn opened(&self) -> usize {
        self.opened
    }
}
