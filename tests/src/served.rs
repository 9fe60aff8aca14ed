//! A server the test process runs itself, inside a lab namespace: a
//! single-threaded runtime on a thread that entered the namespace, so its
//! sockets belong there. Stops, and removes its files, on drop.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};

use crate::netns::Netns;

pub struct Served {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<Result<()>>>>,
    /// Files that belong to the server (removed on drop).
    pub dir: PathBuf,
}

impl Served {
    /// Runs `serve()` in `ns` until drop, and waits until `address` listens.
    pub fn start<F>(
        ns: &Netns,
        address: SocketAddr,
        dir: PathBuf,
        what: &str,
        serve: impl FnOnce() -> F + Send + 'static,
    ) -> Result<Self>
    where
        F: Future<Output = Result<()>>,
    {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                tokio::select! {
                    result = serve() => result,
                    _ = stopped => Ok(()),
                }
            })
        })?;
        let served = Served {
            stop: Some(stop),
            thread: Some(thread),
            dir,
        };
        crate::controlplane::wait_listening(ns, address, Duration::from_secs(10))
            .with_context(|| what.to_string())?;
        Ok(served)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
