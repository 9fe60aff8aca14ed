//! The `ztunnel` binary: flags in, exit code out.

use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::{fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter};
use ztunnel::config::{Args, LogFormat};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let log_control = init_logging(args.log_format);
    // One crypto provider for every TLS context, the control plane's included.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    raise_fd_limit();
    let result = if args.uninstall {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ztunnel::app::uninstall(&args)))
    } else {
        // The control plane, capture and admin: light work, one thread. The
        // data path runs on its own workers (`proxy::workers`, one per core
        // or `--worker-threads`). Multi-threaded all the same, for
        // `block_in_place` around the blocking map and netlink calls.
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ztunnel::app::run(args, log_control)))
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Our errors carry their cause in their message already.
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (text or JSON), with a filter from `RUST_LOG` (default
/// `info`) that the admin port's `/logging` can change at run time.
fn init_logging(format: LogFormat) -> Arc<ztunnel::admin::LogControl> {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|d| Some((ztunnel::admin::log_filter(&d).ok()?, d)));
    let (filter, initial) = from_env.unwrap_or_else(|| (EnvFilter::new("info"), "info".into()));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init(),
    }
    ztunnel::admin::LogControl::new(initial, move |directive: &str| {
        let filter = ztunnel::admin::log_filter(directive)?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Every proxied connection holds two or more descriptors; the usual soft
/// limit of 1024 would cap a node at a few hundred connections. Raise it to
/// the hard limit, as Istio's ztunnel does.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-file limit; connections may be capped");
            }
        }
    }
}
