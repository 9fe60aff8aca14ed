//! `tcp-relay [--connect-tls ROOT] [--accept-tls CHAIN KEY] LISTEN TO`:
//! accepts on LISTEN, connects each connection to TO, and copies both ways
//! until both sides close. No HTTP/2, no capture. `cargo xtask bench` runs
//! one in each node's namespace to measure what two proxy hops cost on
//! their own: a floor for any design with a userspace proxy on both nodes.
//!
//! With `--connect-tls` the relay speaks TLS to TO (checking that TO proves
//! the name `tcp-relay` with a certificate from ROOT); with `--accept-tls`
//! it serves TLS on LISTEN with the certificate chain and key given. A pair
//! of them is the floor for a design that also encrypts between the nodes
//! in user space: the same rustls, crypto provider, TLS 1.3 cipher suite,
//! record queue and copy buffer as ztunnel's HBONE, without HTTP/2. The
//! client presents no certificate: that costs only at the handshake, and
//! this floor measures bulk transfers.
//!
//! It is its own release-built binary because the floor must be as fast as
//! plain copying can be. Run from the xtask (a debug build), the relay's
//! tokio was unoptimised: on one lab, p50 latency through the relays was
//! 65-85 µs against 53-66 µs for this build, and the connection rate
//! 1,424-1,791/s against 1,902-2,592/s. Throughput did not differ (the
//! kernel's copies dominate it).

mod args;
mod tls;

use std::{process::ExitCode, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use args::Args;

/// As ztunnel's relay: large enough that bulk transfers take few syscalls.
const BUFFER: usize = 256 * 1024;

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args = match Args::parse(&raw) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tcp-relay: {e}\nusage: {}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let ends = match tls::Ends::load(&args) {
        Ok(ends) => Arc::new(ends),
        Err(e) => {
            eprintln!("tcp-relay: {e}");
            return ExitCode::from(2);
        }
    };
    // TLS relays run on one thread, as each of ztunnel's workers does. On
    // the multi-threaded runtime a connection's copy moved between threads
    // (work stealing), and TLS relays moved 7.51-8.24 Gbit/s against
    // 7.85-9.48 on one thread (one stream, alternating, one lab). Plain
    // relays moved the same either way (9.45-10.07 against 9.51-10.11) and
    // keep the runtime their earlier figures were taken on.
    let mut builder = if args.connect_tls.is_some() || args.accept_tls.is_some() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tcp-relay: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(relay_forever(args.clone(), ends)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-relay: listening on {}: {e}", args.listen);
            ExitCode::FAILURE
        }
    }
}

async fn relay_forever(args: Args, ends: Arc<tls::Ends>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    loop {
        let (downstream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors or memory: back off, keep serving.
                eprintln!("tcp-relay on {}: {e}", args.listen);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let ends = ends.clone();
        let to = args.to;
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(to).await else {
                return;
            };
            let _ = downstream.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let downstream = match ends.accept(downstream).await {
                Ok(s) => s,
                Err(e) => return eprintln!("tcp-relay: TLS from {peer}: {e}"),
            };
            let upstream = match ends.connect(upstream).await {
                Ok(s) => s,
                Err(e) => return eprintln!("tcp-relay: TLS to {to}: {e}"),
            };
            // One copy per pairing, each monomorphised: the plain floor
            // runs exactly the code it ran before TLS was an option.
            use tls::Stream::{Plain, Tls};
            match (downstream, upstream) {
                (Plain(a), Plain(b)) => copy(a, b).await,
                (Plain(a), Tls(b)) => copy(a, b).await,
                (Tls(a), Plain(b)) => copy(a, b).await,
                (Tls(a), Tls(b)) => copy(a, b).await,
            }
        });
    }
}

async fn copy(
    mut a: impl AsyncRead + AsyncWrite + Unpin,
    mut b: impl AsyncRead + AsyncWrite + Unpin,
) {
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER).await;
}
