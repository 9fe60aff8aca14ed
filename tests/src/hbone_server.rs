//! A scripted HBONE server in a destination pod's place (no ztunnel on its
//! node): it shows what the client side of a tunnel sends, seen from the
//! far end, and answers as a test tells it to.
//!
//! Each CONNECT is held for up to `hold` while the server waits for the
//! request's first bytes, so a test can tell whether they came with the
//! CONNECT or only after an answer. Then the stream is answered 200 and
//! echoed, except that, when asked, the first stream that came with bytes
//! is refused (`REFUSED_STREAM`), as a peer that cannot take it would.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use rustls::pki_types::PrivateKeyDer;
use ztunnel::identity::WorkloadCert;

use crate::netns::Netns;

/// One CONNECT as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which TLS connection (0, 1, ... in accept order) carried it.
    pub connection: usize,
    /// Its authority.
    pub authority: String,
    /// The request bytes that arrived before the server answered.
    pub before_answer: Vec<u8>,
    /// Whether it was refused rather than answered.
    pub refused: bool,
}

#[derive(Default)]
struct Script {
    seen: Vec<Seen>,
    refuse_next_with_bytes: bool,
}

/// The running server; stopped on drop.
pub struct ScriptedServer {
    script: Arc<Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<Result<()>>>>,
}

impl ScriptedServer {
    /// Serves HBONE on `addr` inside `ns` with `cert` (no client
    /// certificate asked for: the test judges what the client sends, not
    /// who it is). `refuse_first`: refuse the first stream that arrives
    /// with request bytes.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        cert: &WorkloadCert,
        hold: Duration,
        refuse_first: bool,
    ) -> Result<Self> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            cert.chain.clone(),
            PrivateKeyDer::Pkcs8(cert.key.clone_key()),
        )?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let script = Arc::new(Mutex::new(Script {
            seen: Vec::new(),
            refuse_next_with_bytes: refuse_first,
        }));
        let listener = ns
            .run(move || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding the scripted HBONE server to {addr}"))?;
        listener.set_nonblocking(true)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = script.clone();
        let thread = ns.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let accepting = async {
                    for connection in 0.. {
                        let Ok((tcp, _)) = listener.accept().await else {
                            return;
                        };
                        let (acceptor, script) = (acceptor.clone(), shared.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let Ok(mut conn) = h2::server::handshake(tls).await else {
                                return;
                            };
                            while let Some(Ok((request, respond))) = conn.accept().await {
                                let script = script.clone();
                                tokio::spawn(serve_stream(
                                    connection, request, respond, hold, script,
                                ));
                            }
                        });
                    }
                };
                tokio::select! {
                    () = accepting => {}
                    _ = stopped => {}
                }
                Ok(())
            })
        })?;
        Ok(ScriptedServer {
            script,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The CONNECTs seen so far, in the order they were answered.
    pub fn seen(&self) -> Vec<Seen> {
        self.script
            .lock()
            .map(|s| s.seen.clone())
            .unwrap_or_default()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_stream(
    connection: usize,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    hold: Duration,
    script: Arc<Mutex<Script>>,
) {
    let authority = request.uri().to_string();
    let mut body = request.into_body();
    // Whatever arrives within `hold`, before any answer.
    let mut before_answer = Vec::new();
    if let Ok(Some(Ok(data))) = tokio::time::timeout(hold, body.data()).await {
        let _ = body.flow_control().release_capacity(data.len());
        before_answer.extend_from_slice(&data);
    }
    let refuse = {
        let Ok(mut script) = script.lock() else {
            return;
        };
        let refuse = script.refuse_next_with_bytes && !before_answer.is_empty();
        if refuse {
            script.refuse_next_with_bytes = false;
        }
        script.seen.push(Seen {
            connection,
            authority,
            before_answer: before_answer.clone(),
            refused: refuse,
        });
        refuse
    };
    if refuse {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    let Ok(ok) = http::Response::builder().status(200).body(()) else {
        return;
    };
    let Ok(mut send) = respond.send_response(ok, false) else {
        return;
    };
    if !before_answer.is_empty() && send.send_data(before_answer.into(), false).is_err() {
        return;
    }
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        if send.send_data(data, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}
