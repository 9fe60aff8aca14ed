//! The `ztunnel` binary: flags in, exit code out.

use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::{fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter};
use ztunnel::config::{Args, LogFormat};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let log_control = init_logging(args.log_format);
    let result = if args.uninstall {
        ztunnel::app::uninstall(&args)
    } else {
        tokio::runtime::Builder::new_multi_thread()
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
fn init_logging(format: LogFormat) -> ztunnel::admin::LogControl {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).init(),
    }
    Arc::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}
