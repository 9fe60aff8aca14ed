//! Waiting for the lab to reach a state, or for one never to happen.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `f` until it holds or `timeout` passes.
pub fn eventually(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails with `what` unless `f` stays false for all of `window`.
pub fn never(what: &str, window: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        if f() {
            bail!("{what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
