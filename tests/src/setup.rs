//! A lab with its configuration file: what every kernel-level test starts
//! from.

use std::path::PathBuf;

use anyhow::Result;

use crate::{lab::Lab, ztunnel::Ztunnel};

/// A fresh lab and a config file written for it; both removed on drop.
pub struct Setup {
    pub lab: Lab,
    pub config: PathBuf,
}

impl Setup {
    /// Brings a lab up with `yaml` as its configuration.
    pub fn new(yaml: &str) -> Result<Self> {
        let lab = Lab::up()?;
        let config = std::env::temp_dir().join(format!("{}-config.yaml", lab.prefix));
        let setup = Setup { lab, config };
        setup.write(yaml)?;
        Ok(setup)
    }

    /// Replaces the configuration, write-then-rename as editors and
    /// ConfigMap updates do.
    pub fn write(&self, yaml: &str) -> Result<()> {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Starts ztunnel on `node` with the lab's CA and `extra` flags.
    pub fn ztunnel(&self, node: &str, extra: &[&str]) -> Result<Ztunnel> {
        Ztunnel::start_with(self.lab.node(node), &self.config, &self.lab.ca_dir, extra)
    }

    /// Starts ztunnel on `node` with extra flags and environment, without
    /// waiting for it to be ready.
    pub fn spawn_ztunnel(
        &self,
        node: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Ztunnel> {
        Ztunnel::spawn(
            self.lab.node(node),
            &self.config,
            &self.lab.ca_dir,
            extra,
            env,
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}
