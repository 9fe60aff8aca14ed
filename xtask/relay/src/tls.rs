//! The relay's optional TLS ends, configured as ztunnel's HBONE is: rustls
//! with aws-lc-rs, TLS 1.3 only, and 256 KiB of records queued before a
//! write (ztunnel's `TLS_SEND_BUFFER`: rustls's default 64 KiB cut each
//! 256 KiB read into several writes and more packets).

use std::{path::Path, sync::Arc};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::args::Args;

/// The name the accepting relay's certificate proves.
pub const SERVER_NAME: &str = "tcp-relay";

const TLS_SEND_BUFFER: usize = 256 * 1024;

/// One end of a relayed connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// How the relay accepts and how it connects: in TLS or in the clear.
pub struct Ends {
    acceptor: Option<TlsAcceptor>,
    connector: Option<TlsConnector>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

impl Ends {
    pub fn load(args: &Args) -> Result<Self, String> {
        let acceptor = match &args.accept_tls {
            Some((chain, key_path)) => {
                let key = PrivateKeyDer::from_pem_file(key_path)
                    .map_err(|e| format!("{}: {e}", key_path.display()))?;
                let mut config = ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| e.to_string())?
                    .with_no_client_auth()
                    .with_single_cert(read_certs(chain)?, key)
                    .map_err(|e| format!("{}: {e}", chain.display()))?;
                config.send_tls13_tickets = 0;
                Some(TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        let connector = match &args.connect_tls {
            Some(root_path) => {
                let mut roots = RootCertStore::empty();
                for root in read_certs(root_path)? {
                    roots
                        .add(root)
                        .map_err(|e| format!("{}: {e}", root_path.display()))?;
                }
                let mut config = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                config.resumption = rustls::client::Resumption::disabled();
                Some(TlsConnector::from(Arc::new(config)))
            }
            None => None,
        };
        Ok(Ends {
            acceptor,
            connector,
        })
    }

    /// The accepted connection, after a TLS handshake if the relay serves TLS.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let Some(acceptor) = &self.acceptor else {
            return Ok(Stream::Plain(tcp));
        };
        let mut tls = acceptor.accept(tcp).await?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        Ok(Stream::Tls(Box::new(tls.into())))
    }

    /// The connection to the destination, after a TLS handshake if the
    /// relay speaks TLS to it.
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let Some(connector) = &self.connector else {
            return Ok(Stream::Plain(tcp));
        };
        let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
        let mut tls = connector.connect(name, tcp).await?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        Ok(Stream::Tls(Box::new(tls.into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A directory of the test's own, removed on drop.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA, a serving certificate from it for `SERVER_NAME`, and its key,
    /// written to a directory of the test's own: root, chain and key.
    fn write_certs(test: &str) -> (TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("tcp-relay-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let guard = TempDir(dir.clone());
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.clone().self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let (root, chain, key_path) = (
            dir.join("root.pem"),
            dir.join("chain.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&root, ca_cert.pem()).unwrap();
        std::fs::write(&chain, leaf.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (guard, root, chain, key_path)
    }

    fn args(connect_tls: Option<PathBuf>, accept_tls: Option<(PathBuf, PathBuf)>) -> Args {
        Args {
            listen: "127.0.0.1:0".parse().unwrap(),
            to: "127.0.0.1:0".parse().unwrap(),
            connect_tls,
            accept_tls,
        }
    }

    /// Connects a client end to a server end over loopback; the server
    /// echoes one message. Returns what the client read back.
    async fn echo_through(server: Ends, client: Ends) -> std::io::Result<Vec<u8>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let serve = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let Stream::Tls(mut tls) = server.accept(tcp).await? else {
                return Err(std::io::Error::other("the server end is not TLS"));
            };
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await
        });
        let Stream::Tls(mut tls) = client.connect(TcpStream::connect(addr).await?).await? else {
            return Err(std::io::Error::other("the client end is not TLS"));
        };
        tls.write_all(b"hello").await?;
        tls.flush().await?;
        let mut back = vec![0u8; 5];
        tls.read_exact(&mut back).await?;
        serve.await.map_err(std::io::Error::other)??;
        Ok(back)
    }

    #[tokio::test]
    async fn a_tls_pair_carries_bytes_when_the_server_proves_its_name() {
        let (_dir, root, chain, key) = write_certs("ok");
        let server = Ends::load(&args(None, Some((chain, key)))).unwrap();
        let client = Ends::load(&args(Some(root), None)).unwrap();
        assert_eq!(echo_through(server, client).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn a_server_from_another_root_is_refused() {
        let (_dir, _, chain, key) = write_certs("server");
        let (_other_dir, other_root, _, _) = write_certs("other");
        let server = Ends::load(&args(None, Some((chain, key)))).unwrap();
        let client = Ends::load(&args(Some(other_root), None)).unwrap();
        let err = echo_through(server, client).await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    #[test]
    fn plain_ends_need_no_files_and_missing_files_are_named() {
        assert!(Ends::load(&args(None, None)).is_ok());
        let missing = PathBuf::from("/nonexistent/root.pem");
        let err = Ends::load(&args(Some(missing), None)).err().unwrap();
        assert!(err.contains("/nonexistent/root.pem"), "{err}");
    }
}
