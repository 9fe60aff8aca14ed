//! The relay's command line, parsed by hand: the relay keeps its
//! dependencies to what it copies with.

use std::{net::SocketAddr, path::PathBuf};

pub const USAGE: &str =
    "tcp-relay [--connect-tls ROOT_PEM] [--accept-tls CHAIN_PEM KEY_PEM] LISTEN_ADDR:PORT TO_ADDR:PORT";

#[derive(Debug, Clone)]
pub struct Args {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    /// Speak TLS to `to`, trusting the certificates in this file.
    pub connect_tls: Option<PathBuf>,
    /// Serve TLS on `listen` with this certificate chain and key.
    pub accept_tls: Option<(PathBuf, PathBuf)>,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut connect_tls = None;
        let mut accept_tls = None;
        let mut addrs = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |what: &str| {
                it.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("{arg} needs {what}"))
            };
            match arg.as_str() {
                "--connect-tls" => connect_tls = Some(value("a PEM file of trusted roots")?),
                "--accept-tls" => {
                    let chain = value("a PEM certificate chain and a PEM key")?;
                    let key = value("a PEM key after the certificate chain")?;
                    accept_tls = Some((chain, key));
                }
                flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
                addr => addrs.push(addr),
            }
        }
        let [listen, to] = addrs[..] else {
            return Err(format!("expected 2 addresses, got {}", addrs.len()));
        };
        let addr = |what: &str, s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|e| format!("{what} address {s:?}: {e}"))
        };
        Ok(Args {
            listen: addr("listen", listen)?,
            to: addr("destination", to)?,
            connect_tls,
            accept_tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn plain_relay_takes_two_addresses() {
        let args = parse(&["127.0.0.1:1", "127.0.0.1:2"]).unwrap();
        assert_eq!(args.to.port(), 2);
        assert!(args.connect_tls.is_none() && args.accept_tls.is_none());
    }

    #[test]
    fn tls_options_take_their_files() {
        let args = parse(&[
            "--accept-tls",
            "chain.pem",
            "key.pem",
            "--connect-tls",
            "root.pem",
            "127.0.0.1:1",
            "127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(args.connect_tls.unwrap(), PathBuf::from("root.pem"));
        assert_eq!(args.accept_tls.unwrap().1, PathBuf::from("key.pem"));
    }

    #[test]
    fn bad_input_is_named() {
        assert!(parse(&["127.0.0.1:1"]).unwrap_err().contains("2 addresses"));
        assert!(parse(&["--accept-tls", "chain.pem"])
            .unwrap_err()
            .contains("key"));
        assert!(parse(&["--fast", "a", "b"]).unwrap_err().contains("--fast"));
        assert!(parse(&["nowhere", "127.0.0.1:2"])
            .unwrap_err()
            .contains("listen address"));
    }
}
