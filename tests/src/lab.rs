//! The lab: nodes and pods as network namespaces, wired like a two-node
//! cluster with routed (Calico-style) pod networking.
//!
//! ```text
//!   pod ns ──veth── node1 ns ──underlay veth── node2 ns ──veth── pod ns
//! ```
//! - underlay 198.18.0.0/24 (node1 .1, node2 .2);
//! - node N's pods in 198.18.N.0/24, each a /32 on its `eth0` with a default
//!   route via a link-local gateway that resolves to the host-side veth; the
//!   node answers ARP for the pod's neighbours (proxy ARP on the veth), routes
//!   the /32 to the veth, and the other node's pod CIDR via the underlay;
//! - service VIPs in 198.18.100.0/24 have no route anywhere: only capture
//!   gives them meaning, as kube-proxy-less ambient meshes do.
//!
//! Every address is inside namespaces the lab made (198.18.0.0/15 is the
//! benchmarking range, so none of them can be mistaken for a real network).
//! Names carry a per-run prefix; everything, pins included, is removed on
//! drop, also when a test fails.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Root of every lab instance's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/ztunnel";
/// Every lab namespace name starts with this.
pub const NAME_PREFIX: &str = "ztlab";

/// One pod of the standard topology.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec {
    pub name: &'static str,
    /// Index into [`NODES`].
    pub node: usize,
    pub ip: Ipv4Addr,
    /// Whether the shipped example configuration enrolls it.
    pub enrolled: bool,
    pub service_account: &'static str,
}

/// The nodes: logical names (what `NODE_NAME` and the config's `node` say).
pub const NODES: [&str; 2] = ["node1", "node2"];

/// The standard pods.
pub const PODS: [PodSpec; 5] = [
    PodSpec {
        name: "client",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 1, 10),
        enrolled: true,
        service_account: "client",
    },
    PodSpec {
        name: "bystander",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 1, 11),
        enrolled: false,
        service_account: "bystander",
    },
    PodSpec {
        name: "neighbor",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 1, 12),
        enrolled: true,
        service_account: "neighbor",
    },
    PodSpec {
        name: "server",
        node: 1,
        ip: Ipv4Addr::new(198, 18, 2, 10),
        enrolled: true,
        service_account: "server",
    },
    PodSpec {
        name: "plain",
        node: 1,
        ip: Ipv4Addr::new(198, 18, 2, 11),
        enrolled: false,
        service_account: "plain",
    },
];

/// The pods' default gateway (never assigned to anything).
const GATEWAY: &str = "169.254.1.1";
/// The bridge of bridged pods (flannel's and the bridge plugin's `cni0`),
/// its subnet and its address, the pods' gateway.
pub const BRIDGE: &str = "zcni0";
pub const BRIDGE_SUBNET: &str = "198.18.3.0/24";
pub const BRIDGE_GATEWAY: &str = "198.18.3.1";

fn link_mac(ns: &Netns, link: &str) -> Result<String> {
    let out = ns.ip(&["-j", "link", "show", link])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link output")?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no MAC address for {link}"))
}

fn underlay_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, node as u8 + 1)
}

fn pod_cidr(node: usize) -> String {
    format!("198.18.{}.0/24", node + 1)
}

/// A node namespace.
pub struct Node {
    pub name: &'static str,
    pub ns: Netns,
    pub underlay_ip: Ipv4Addr,
    /// Where this node's ztunnel pins its objects.
    pub pin_dir: PathBuf,
}

/// A pod namespace.
pub struct Pod {
    pub spec: PodSpec,
    pub ns: Netns,
    /// Host-side veth name, in the node namespace.
    pub veth: String,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.spec.ip, port))
    }
}

/// A running lab. Dropping it removes everything it made.
pub struct Lab {
    pub prefix: String,
    // Pods before nodes: drop order removes pods' namespaces first.
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    /// The CA every node's ztunnel issues from (Istio's plug-in layout), so
    /// nodes trust each other without a control plane.
    pub ca_dir: PathBuf,
    keep: bool,
}

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix unique to this process and call.
pub fn unique_prefix() -> String {
    let n = RUN_COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{NAME_PREFIX}{:x}{n}{:x}",
        std::process::id(),
        nanos & 0xfff
    )
}

impl Lab {
    /// Builds the standard topology under a fresh unique prefix.
    pub fn up() -> Result<Self> {
        Self::up_named(&unique_prefix())
    }

    /// Builds the standard topology with the given prefix.
    pub fn up_named(prefix: &str) -> Result<Self> {
        let ca_dir = std::env::temp_dir().join(format!("{prefix}-ca"));
        ztunnel::identity::ca::generate_dev_root(&ca_dir).context("generating the lab's CA")?;
        let mut lab = Lab {
            prefix: prefix.to_string(),
            pods: Vec::new(),
            nodes: Vec::new(),
            ca_dir,
            keep: false,
        };
        for (i, name) in NODES.iter().enumerate() {
            let ns = Netns::create(&format!("{prefix}-{name}"))?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            lab.nodes.push(Node {
                name,
                ns,
                underlay_ip: underlay_ip(i),
                pin_dir: Path::new(PIN_ROOT).join(format!("{prefix}-{name}")),
            });
        }
        lab.wire_underlay().context("wiring the underlay")?;
        for spec in PODS {
            let pod = lab
                .add_pod(spec)
                .with_context(|| format!("creating pod {}", spec.name))?;
            lab.pods.push(pod);
        }
        Ok(lab)
    }

    fn wire_underlay(&self) -> Result<()> {
        let (n1, n2) = (&self.nodes[0], &self.nodes[1]);
        add_veth_pair(&n1.ns, "eth0", None, &n2.ns)?;
        for (i, node) in self.nodes.iter().enumerate() {
            node.ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", node.underlay_ip),
                "dev",
                "eth0",
            ])?;
            node.ns.ip(&["link", "set", "eth0", "up"])?;
            let other = 1 - i;
            node.ns.ip(&[
                "route",
                "add",
                &pod_cidr(other),
                "via",
                &underlay_ip(other).to_string(),
                "dev",
                "eth0",
            ])?;
        }
        Ok(())
    }

    /// Creates a pod beyond the standard ones (e.g. one that appears after
    /// its workload was configured); it is removed with the lab.
    pub fn add_extra_pod(&mut self, spec: PodSpec) -> Result<()> {
        let pod = self.add_pod(spec)?;
        self.pods.push(pod);
        Ok(())
    }

    /// Creates a pod whose node has no route to it: its veth is one the
    /// node's routing never names, as a veth whose sandbox is still being
    /// set up, so nothing tells ztunnel about it.
    pub fn add_unrouted_pod(&mut self, spec: PodSpec) -> Result<()> {
        let pod = self.add_pod_routed(spec, false)?;
        self.pods.push(pod);
        Ok(())
    }

    /// Creates a pod wired as flannel and the bridge plugin wire them: its
    /// host-side veth a port of the node's bridge [`BRIDGE`] (created with
    /// the first such pod, gateway [`BRIDGE_GATEWAY`] on [`BRIDGE_SUBNET`]),
    /// no host route of its own. The pod then greets its gateway, so the
    /// node has learned its neighbour and forwarding entries, as it has
    /// for any pod that has sent anything.
    pub fn add_bridged_pod(&mut self, spec: PodSpec) -> Result<()> {
        let node = &self.nodes[spec.node];
        if node.ns.ip(&["link", "show", BRIDGE]).is_err() {
            node.ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
            node.ns.ip(&[
                "addr",
                "add",
                &format!("{BRIDGE_GATEWAY}/24"),
                "dev",
                BRIDGE,
            ])?;
            node.ns.ip(&["link", "set", BRIDGE, "up"])?;
            // The other node reaches the bridge's subnet through this one.
            for other in self.nodes.iter().filter(|n| n.name != node.name) {
                other.ns.ip(&[
                    "route",
                    "add",
                    BRIDGE_SUBNET,
                    "via",
                    &node.underlay_ip.to_string(),
                ])?;
            }
        }
        let (ns, veth) = self.pod_netns(node, &spec)?;
        node.ns.ip(&["link", "set", &veth, "master", BRIDGE])?;
        node.ns.ip(&["link", "set", &veth, "up"])?;
        ns.ip(&["addr", "add", &format!("{}/24", spec.ip), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", BRIDGE_GATEWAY])?;
        // Any packet to the gateway does (ARP first); a refused connection
        // is enough.
        let gateway = std::net::SocketAddr::from((
            BRIDGE_GATEWAY
                .parse::<Ipv4Addr>()
                .context("bridge gateway")?,
            9,
        ));
        ns.run(move || {
            let _ =
                std::net::TcpStream::connect_timeout(&gateway, std::time::Duration::from_secs(2));
        })
        .context("the bridged pod greeting its gateway")?;
        self.pods.push(Pod { spec, ns, veth });
        Ok(())
    }

    /// The pod's namespace, and a veth pair between it (`eth0`) and the
    /// node (`vz<name>`, returned).
    fn pod_netns(&self, node: &Node, spec: &PodSpec) -> Result<(Netns, String)> {
        let ns = Netns::create(&format!("{}-{}", self.prefix, spec.name))?;
        let veth = format!("vz{}", spec.name);
        add_veth_pair(&node.ns, &veth, None, &ns)?;
        Ok((ns, veth))
    }

    fn add_pod(&self, spec: PodSpec) -> Result<Pod> {
        self.add_pod_routed(spec, true)
    }

    fn add_pod_routed(&self, spec: PodSpec, routed: bool) -> Result<Pod> {
        let node = &self.nodes[spec.node];
        let (ns, veth) = self.pod_netns(node, &spec)?;
        wire_pod(node, &ns, &veth, &spec, routed)?;
        Ok(Pod { spec, ns, veth })
    }

    /// Gives pod `name` a new veth pair, as a pod sandbox recreated with the
    /// same address gets one: the old pair must be gone (deleting the
    /// host-side veth removes both ends and the node's route). The new
    /// host-side veth has the old one's name and a new ifindex.
    pub fn rewire_pod(&self, name: &str) -> Result<()> {
        let pod = self.pod(name);
        let node = &self.nodes[pod.spec.node];
        add_veth_pair(&node.ns, &pod.veth, None, &pod.ns)?;
        wire_pod(node, &pod.ns, &pod.veth, &pod.spec, true)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("the lab has no pod {name}"))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("the lab has no node {name}"))
    }

    /// Lets every namespace reuse TIME_WAIT ports for new connections, a
    /// load generator's usual setting: thousands of short connections a
    /// second would otherwise exhaust the client's ports, and the connection
    /// rate falls as a lab is used (for `bench` and `lab up`).
    pub fn reuse_time_wait(&self) -> Result<()> {
        for ns in self
            .pods
            .iter()
            .map(|p| &p.ns)
            .chain(self.nodes.iter().map(|n| &n.ns))
        {
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        Ok(())
    }

    /// Leaves the lab in place when dropped (`cargo xtask lab up`).
    pub fn keep(&mut self) {
        self.keep = true;
        for pod in &mut self.pods {
            pod.ns.keep();
        }
        for node in &mut self.nodes {
            node.ns.keep();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Namespaces are removed by their own drops (pods first); the pins
        // live on the host's bpffs and outlive them.
        self.pods.clear();
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.pin_dir);
            remove_sockets(node.ns.name());
        }
        let _ = std::fs::remove_dir_all(&self.ca_dir);
    }
}

/// Removes every lab namespace and pin directory whose name starts with
/// `prefix` (all labs when it is [`NAME_PREFIX`]).
pub fn teardown(prefix: &str) -> Result<Vec<String>> {
    let out = crate::netns::run(std::process::Command::new("ip").args(["netns", "list"]))?;
    let mut removed = Vec::new();
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect();
    // Pods (three dash-separated parts are not guaranteed), so just delete all.
    for name in names {
        drop(Netns::existing(&name));
        removed.push(name);
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // The lab's CA, and its control plane's tokens and log.
            if name.starts_with(prefix)
                && (name.ends_with("-ca") || name.ends_with("-controlplane"))
            {
                let _ = std::fs::remove_dir_all(entry.path());
                removed.push(entry.path().display().to_string());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(PIN_ROOT) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
                removed.push(entry.path().display().to_string());
            }
        }
    }
    remove_sockets(prefix);
    Ok(removed)
}

/// Where ztunnel keeps its admin and handover sockets.
const SOCKET_DIR: &str = "/run/ztunnel";

/// Removes the sockets of the lab ztunnels whose pin directory name starts
/// with `prefix` (a killed ztunnel leaves them behind).
fn remove_sockets(prefix: &str) {
    if let Ok(entries) = std::fs::read_dir(SOCKET_DIR) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The lab's workloads in the local-file schema, with `enrolled` deciding
/// `protocol` for each pod by name (pods not listed keep their default).
pub fn config_yaml(enrolled: &[(&str, bool)]) -> String {
    config_yaml_with(enrolled, &[], "")
}

/// [`config_yaml`], with pods made endpoints of services (`(pod, yaml map
/// of service key to port map)`, e.g. `("server", "\"default/echo\": {80: 8080}")`)
/// and `tail` appended (a `services:` or `policies:` section).
pub fn config_yaml_with(
    enrolled: &[(&str, bool)],
    endpoints: &[(&str, &str)],
    tail: &str,
) -> String {
    config_yaml_extra(enrolled, endpoints, &[], tail)
}

/// [`config_yaml_with`], with workloads beyond the standard pods (pods
/// created later, or addresses no pod has).
pub fn config_yaml_extra(
    enrolled: &[(&str, bool)],
    endpoints: &[(&str, &str)],
    extra: &[PodSpec],
    tail: &str,
) -> String {
    let mut out = String::from(
        "# Generated by the lab: the workloads of the two-node topology.\nworkloads:\n",
    );
    for spec in PODS.iter().chain(extra) {
        let on = enrolled
            .iter()
            .find(|(n, _)| *n == spec.name)
            .map(|(_, e)| *e)
            .unwrap_or(spec.enrolled);
        let services = endpoints
            .iter()
            .filter(|(pod, _)| *pod == spec.name)
            .map(|(_, map)| *map)
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&workload_yaml(spec, on, &services));
    }
    out.push_str(tail);
    out
}

/// One entry of the `workloads` list, for a pod of the lab.
pub fn workload_yaml(spec: &PodSpec, enrolled: bool, services: &str) -> String {
    format!(
        "- uid: lab//v1/Pod/default/{name}\n  name: {name}\n  workloadName: {name}\n  canonicalName: {name}\n  canonicalRevision: v1\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: {proto}\n  node: {node}\n  services: {{{services}}}\n",
        name = spec.name,
        sa = spec.service_account,
        ip = spec.ip,
        proto = if enrolled { "HBONE" } else { "TCP" },
        node = NODES[spec.node],
    )
}

/// Addresses, routes and sysctls for a pod on `node` whose veth pair
/// exists: `veth` on the node, `eth0` in `ns`.
fn wire_pod(node: &Node, ns: &Netns, veth: &str, spec: &PodSpec, routed: bool) -> Result<()> {
    node.ns
        .sysctl(&format!("net.ipv4.conf.{veth}.proxy_arp"), "1")?;
    node.ns
        .sysctl(&format!("net.ipv4.conf.{veth}.rp_filter"), "0")?;
    node.ns.ip(&["link", "set", veth, "up"])?;
    if routed {
        node.ns
            .ip(&["route", "add", &format!("{}/32", spec.ip), "dev", veth])?;
    }
    ns.ip(&["addr", "add", &format!("{}/32", spec.ip), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    // Calico's trick: a link-local gateway the pod reaches by a permanent
    // neighbour entry pointing at the host-side veth, so every packet,
    // even to an address the node has no route for (a service VIP), goes
    // to the node.
    let mac = link_mac(&node.ns, veth)?;
    ns.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
    ns.ip(&[
        "neigh",
        "add",
        GATEWAY,
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    ns.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
    Ok(())
}

/// A veth pair: `name` in `ns` (with ifindex `index` if given), `eth0` in
/// `peer_ns`.
pub fn add_veth_pair(ns: &Netns, name: &str, index: Option<u32>, peer_ns: &Netns) -> Result<()> {
    let index = index.map(|i| i.to_string());
    let mut args = vec!["link", "add", name];
    if let Some(index) = &index {
        args.extend(["index", index.as_str()]);
    }
    args.extend([
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer_ns.name(),
    ]);
    ns.ip(&args)?;
    Ok(())
}
