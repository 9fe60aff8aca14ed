//! `tcp-relay LISTEN TO`: accepts on LISTEN, connects each connection to TO,
//! and copies both ways until both sides close. No TLS, no HTTP/2, no
//! capture. `cargo xtask bench` runs one in each node's namespace to measure
//! what two proxy hops cost on their own: a floor for any design with a
//! userspace proxy on both nodes.
//!
//! It is its own release-built binary because the floor must be as fast as
//! plain copying can be. Run from the xtask (a debug build), the relay's
//! tokio was unoptimised: on one lab, p50 latency through the relays was
//! 65-85 µs against 53-66 µs for this build, and the connection rate
//! 1,424-1,791/s against 1,902-2,592/s. Throughput did not differ (the
//! kernel's copies dominate it).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

/// As ztunnel's relay: large enough that bulk transfers take few syscalls.
const BUFFER: usize = 256 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, to) = match parse(&args) {
        Ok(addrs) => addrs,
        Err(e) => {
            eprintln!("tcp-relay: {e}\nusage: tcp-relay LISTEN_ADDR:PORT TO_ADDR:PORT");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tcp-relay: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(relay_forever(listen, to)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-relay: listening on {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<(SocketAddr, SocketAddr), String> {
    let [listen, to] = args else {
        return Err(format!("expected 2 arguments, got {}", args.len()));
    };
    let addr = |what: &str, s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("{what} address {s:?}: {e}"))
    };
    Ok((addr("listen", listen)?, addr("destination", to)?))
}

async fn relay_forever(listen: SocketAddr, to: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (mut downstream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors or memory: back off, keep serving.
                eprintln!("tcp-relay on {listen}: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let Ok(mut upstream) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let _ = downstream.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut downstream,
                &mut upstream,
                BUFFER,
                BUFFER,
            )
            .await;
        });
    }
}
