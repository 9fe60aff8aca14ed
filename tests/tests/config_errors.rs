//! A configuration ztunnel cannot use is refused before the kernel is
//! touched, with an error naming the file and the field.

use anyhow::Result;
use ztunnel_tests::{
    lab::{self, Lab},
    ztunnel::run_to_exit,
};

fn refused(yaml: &str, expect_field: &str) -> Result<()> {
    let lab = Lab::up()?;
    let node = lab.node("node1");
    let config = std::env::temp_dir().join(format!("{}-bad.yaml", lab.prefix));
    std::fs::write(&config, yaml)?;
    let out = run_to_exit(node, &config, &lab.ca_dir, &[])?;
    let _ = std::fs::remove_file(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bad config accepted:\n{stderr}");
    assert!(
        stderr.contains(&config.display().to_string()),
        "error does not name the file:\n{stderr}"
    );
    assert!(
        stderr.contains(expect_field),
        "error does not name {expect_field}:\n{stderr}"
    );
    assert!(
        !node.pin_dir.exists(),
        "kernel state created for a refused config"
    );
    let rules = node.ns.ip(&["rule", "show"])?;
    assert!(
        !rules.contains("0x5390000"),
        "routing rule installed for a refused config"
    );
    Ok(())
}

#[test]
fn unknown_field_is_refused() -> Result<()> {
    let yaml = lab::config_yaml(&[]).replacen(
        "  namespace: default\n",
        "  namespace: default\n  nodeName: oops\n",
        1,
    );
    refused(&yaml, "workloads[0]")?;
    Ok(())
}

#[test]
fn bad_address_is_refused() -> Result<()> {
    let yaml = lab::config_yaml(&[]).replacen("198.18.1.11", "198.18.1.311", 1);
    refused(&yaml, "workloads[1].workloadIps[0]")
}

#[test]
fn bad_tag_is_refused() -> Result<()> {
    let yaml = format!(
        "{}policies:\n- name: p\n  namespace: default\n  scope: Namespace\n  action: Allow\n  dryRun: false\n  rules:\n  - - - principals: [!Exactly cluster.local/ns/default/sa/client]\n",
        lab::config_yaml(&[])
    );
    refused(&yaml, "policies[0].rules[0][0][0].principals[0]")
}
