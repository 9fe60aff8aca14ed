//! The node netns's routing: finding a pod's host-side veth and the uplinks,
//! and the policy route that delivers captured packets locally.
//!
//! Uses iproute2's JSON output: the same view an operator gets with `ip`, and
//! no netlink state to keep in sync. Only ztunnel's own rule and table are
//! ever changed.

use std::{net::Ipv4Addr, process::Command};

use serde::Deserialize;
use ztunnel_common::{CAPTURE_MARK, CAPTURE_MARK_MASK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY};

use super::RedirectError;

/// A network interface in ztunnel's netns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

#[derive(Deserialize)]
struct RouteEntry {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    dst: Option<String>,
}

#[derive(Deserialize)]
struct RuleEntry {
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    table: Option<String>,
}

fn ip(args: &[&str]) -> Result<String, RedirectError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RedirectError::Ip {
            args: args.join(" "),
            message: source.to_string(),
        })?;
    if !output.status.success() {
        return Err(RedirectError::Ip {
            args: args.join(" "),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn parse_json<T: for<'de> Deserialize<'de>>(args: &[&str], out: &str) -> Result<T, RedirectError> {
    // `ip -j` prints nothing at all for an empty result.
    let out = if out.trim().is_empty() { "[]" } else { out };
    serde_json::from_str(out).map_err(|e| RedirectError::Ip {
        args: args.join(" "),
        message: format!("unexpected JSON: {e}"),
    })
}

/// The interface index of `name`, or `None` if there is no such interface.
pub fn ifindex(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The main routing table, read once per sync.
pub struct RouteTable {
    routes: Vec<RouteEntry>,
}

impl RouteTable {
    /// Reads the main table of ztunnel's netns.
    pub fn read() -> Result<Self, RedirectError> {
        let args = ["-j", "route", "show", "table", "main"];
        let routes: Vec<RouteEntry> = parse_json(&args, &ip(&args)?)?;
        Ok(RouteTable { routes })
    }

    fn unicast(&self) -> impl Iterator<Item = &RouteEntry> {
        self.routes
            .iter()
            .filter(|r| r.kind.as_deref().unwrap_or("unicast") == "unicast")
    }

    /// The interface the node routes `pod_ip` through with a host route: for
    /// routed (Calico-style) wiring, the pod's host-side veth. `None` when the
    /// pod has no host route of its own yet (e.g. before its sandbox exists).
    pub fn pod_interface(&self, pod_ip: Ipv4Addr) -> Option<Interface> {
        let ip_text = pod_ip.to_string();
        let host = format!("{ip_text}/32");
        let dev = self
            .unicast()
            .find(|r| r.dst.as_deref().is_some_and(|d| d == ip_text || d == host))
            .and_then(|r| r.dev.clone())?;
        ifindex(&dev).map(|index| Interface { name: dev, index })
    }

    /// Interfaces that carry traffic into the node from anything but a known
    /// local pod: every device the main table routes through, except loopback
    /// and the given pod veths. This includes the veths of local pods ztunnel
    /// has no workload for, which is what we want: to an enrolled pod they
    /// are just another outside client.
    pub fn uplinks(&self, pod_interfaces: &[String]) -> Vec<Interface> {
        let mut uplinks: Vec<Interface> = self
            .unicast()
            .filter_map(|r| r.dev.clone())
            .filter(|dev| dev != "lo" && !pod_interfaces.contains(dev))
            .filter_map(|dev| ifindex(&dev).map(|index| Interface { name: dev, index }))
            .collect();
        uplinks.sort();
        uplinks.dedup();
        uplinks
    }
}

fn mark_arg() -> String {
    format!("{CAPTURE_MARK:#x}/{CAPTURE_MARK_MASK:#x}")
}

/// Installs `ip rule fwmark CAPTURE_MARK lookup CAPTURE_ROUTE_TABLE` and the
/// table's `local 0.0.0.0/0 dev lo` route. Idempotent, so a restart after a
/// crash finds them in place.
pub fn install_capture_route() -> Result<(), RedirectError> {
    let table = CAPTURE_ROUTE_TABLE.to_string();
    ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    if !capture_rule_present()? {
        let priority = CAPTURE_RULE_PRIORITY.to_string();
        ip(&[
            "rule",
            "add",
            "fwmark",
            &mark_arg(),
            "lookup",
            &table,
            "priority",
            &priority,
        ])?;
    }
    Ok(())
}

/// Removes the rule and the route installed by [`install_capture_route`].
pub fn remove_capture_route() -> Result<(), RedirectError> {
    while capture_rule_present()? {
        let priority = CAPTURE_RULE_PRIORITY.to_string();
        ip(&["rule", "del", "priority", &priority, "fwmark", &mark_arg()])?;
    }
    let table = CAPTURE_ROUTE_TABLE.to_string();
    // Absent already is fine: nothing else uses this table.
    let _ = ip(&[
        "route",
        "del",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ]);
    Ok(())
}

fn capture_rule_present() -> Result<bool, RedirectError> {
    let args = ["-j", "rule", "show"];
    let rules: Vec<RuleEntry> = parse_json(&args, &ip(&args)?)?;
    let table = CAPTURE_ROUTE_TABLE.to_string();
    Ok(rules.iter().any(|r| {
        r.priority == Some(CAPTURE_RULE_PRIORITY) && r.table.as_deref() == Some(table.as_str())
    }))
}
