//! The `ztunnel` binary: flags in, exit code out.

use clap::Parser;
use tracing_subscriber::{fmt, EnvFilter};
use ztunnel::config::{Args, LogFormat};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let result = if args.uninstall {
        ztunnel::app::uninstall(&args)
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ztunnel::app::run(args)))
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

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
