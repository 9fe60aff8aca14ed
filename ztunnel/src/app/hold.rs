//! A test-only hook: `ZTUNNEL_TEST_STARTUP_HOLD=<duration>` pauses a
//! starting ztunnel after each stage, so tests can send traffic at every
//! point of a start and check that none of it leaks. Unset, it costs
//! nothing and logs nothing.

use std::time::Duration;

use tracing::info;

pub struct StartupHold(Option<Duration>);

impl StartupHold {
    pub fn from_env() -> Self {
        StartupHold(
            std::env::var("ZTUNNEL_TEST_STARTUP_HOLD")
                .ok()
                .and_then(|v| crate::config::parse_duration(&v).ok()),
        )
    }

    /// Marks the end of a startup stage.
    pub async fn stage(&self, name: &str) {
        if let Some(pause) = self.0 {
            info!(
                stage = name,
                ?pause,
                "startup stage done; holding (test hook)"
            );
            tokio::time::sleep(pause).await;
        }
    }
}
