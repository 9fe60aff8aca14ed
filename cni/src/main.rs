//! `ztunnel-cni`: run by the container runtime as a CNI plugin (when
//! `CNI_COMMAND` is set), or by the DaemonSet to install and uninstall
//! itself.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use ztunnel_cni::{
    install::{install_binary, install_config, uninstall, Settings},
    plugin,
    protocol::DEFAULT_SOCKET,
};

const USAGE: &str = "usage:
  ztunnel-cni install [--bin-dir DIR] [--conf-dir DIR] [--socket PATH]
                      [--timeout-seconds N] [--exclude-namespaces a,b] [--watch SECONDS]
  ztunnel-cni uninstall [--bin-dir DIR] [--conf-dir DIR] [--watch SECONDS]
  (run with CNI_COMMAND set, it is the CNI plugin)";

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return as_plugin();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel-cni: {e}");
            ExitCode::from(2)
        }
    }
}

fn as_plugin() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
        eprintln!("ztunnel-cni: reading the network configuration: {e}");
    }
    let outcome = plugin::run(&|name| std::env::var(name).ok(), &stdin);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        eprintln!("ztunnel-cni: {}", outcome.stdout);
        ExitCode::FAILURE
    }
}

struct Options {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    settings: Settings,
    watch: Option<Duration>,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        bin_dir: "/host/opt/cni/bin".into(),
        conf_dir: "/host/etc/cni/net.d".into(),
        settings: Settings {
            socket: DEFAULT_SOCKET.into(),
            timeout_seconds: plugin::DEFAULT_TIMEOUT.as_secs(),
            exclude_namespaces: vec!["kube-system".into()],
        },
        watch: None,
    };
    // `--flag value` and `--flag=value` alike.
    let split: Vec<String> = args
        .iter()
        .flat_map(|a| match a.split_once('=') {
            Some((flag, value)) if a.starts_with("--") => vec![flag.to_string(), value.to_string()],
            _ => vec![a.clone()],
        })
        .collect();
    let mut it = split.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bin-dir" => o.bin_dir = value()?.into(),
            "--conf-dir" => o.conf_dir = value()?.into(),
            "--socket" => o.settings.socket = value()?,
            "--timeout-seconds" => {
                o.settings.timeout_seconds = value()?
                    .parse()
                    .map_err(|e| format!("--timeout-seconds: {e}"))?
            }
            "--exclude-namespaces" => {
                o.settings.exclude_namespaces = value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--watch" => {
                let secs: u64 = value()?.parse().map_err(|e| format!("--watch: {e}"))?;
                o.watch = Some(Duration::from_secs(secs.max(1)));
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn run(args: &[String]) -> Result<(), String> {
    let Some((command, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    let o = options(rest)?;
    match command.as_str() {
        "install" => install(&o),
        "uninstall" => loop {
            // With --watch it keeps it removed (a DaemonSet runs it so).
            match uninstall(&o.conf_dir, &o.bin_dir) {
                Ok(changed) => {
                    for path in changed {
                        eprintln!("ztunnel-cni: removed from {}", path.display());
                    }
                }
                Err(e) if o.watch.is_none() => return Err(e.to_string()),
                Err(e) => eprintln!("ztunnel-cni: {e} (retrying)"),
            }
            let Some(every) = o.watch else { return Ok(()) };
            std::thread::sleep(every);
        },
        _ => Err(USAGE.into()),
    }
}

/// Installs once, or keeps it installed: the cluster's CNI may rewrite its
/// configuration (at its own restarts) without our entry.
fn install(o: &Options) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    loop {
        let attempt = install_binary(&exe, &o.bin_dir).and_then(|wrote| {
            if wrote {
                eprintln!(
                    "ztunnel-cni: installed {}",
                    o.bin_dir.join("ztunnel-cni").display()
                );
            }
            install_config(&o.conf_dir, &o.settings)
        });
        match (attempt, o.watch) {
            (Ok((path, true)), _) => eprintln!("ztunnel-cni: chained into {}", path.display()),
            (Ok(_), _) => {}
            (Err(e), None) => return Err(e.to_string()),
            (Err(e), Some(_)) => eprintln!("ztunnel-cni: {e} (retrying)"),
        }
        let Some(every) = o.watch else { return Ok(()) };
        std::thread::sleep(every);
    }
}
