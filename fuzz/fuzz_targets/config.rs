//! The local configuration file: read as ztunnel reads `--config`
//! (`LocalConfig::parse`), then turned into what ztunnel serves from: the
//! snapshot and the kernel policy tables. A configuration accepted must
//! write out as YAML that is accepted again, unchanged.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ztunnel::{config::local::LocalConfig, state::Snapshot};

fuzz_target!(|data: &[u8]| {
    // `LocalConfig::load` refuses a file that is not UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let Ok(config) = LocalConfig::parse(text, path) else {
        return;
    };
    // Seen from the first workload's node, so that some are local.
    let node = config
        .workloads
        .first()
        .map(|w| w.node.clone())
        .unwrap_or_default();
    let snapshot = Snapshot::new(&node, "cluster.local", &config);
    let _ = snapshot.capture_plan(&[]);
    let _ = ztunnel::authz::kernel::compile(&snapshot);

    let yaml = serde_yaml::to_string(&config).expect("an accepted configuration serializes");
    match LocalConfig::parse(&yaml, path) {
        Ok(again) => assert_eq!(again, config, "written as:\n{yaml}"),
        Err(e) => panic!("written as:\n{yaml}\nit is refused: {e}"),
    }
});
