//! Pod enrollment from the Kubernetes API (`--enroll-pods`), against a
//! scripted API server: ambient pods are captured, then annotated for
//! istiod, never the other way round; pods that leave ambient mode lose the
//! annotation and their capture; a restart does not flap annotations.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use ztunnel_tests::{
    apiserver::{capture_in_place, ApiServer, PatchRecord},
    lab::{self, Lab, PODS},
    setup::Setup,
    traffic::{request, Server},
    ztunnel::{counters, Ztunnel},
};

const ANNOTATION: &str = "ambient.istio.io/redirection";
const MODE: &str = "istio.io/dataplane-mode";

/// The API server with namespace `default` in ambient mode and every lab
/// pod, `plain` opted out; each PATCH records whether the pod's capture was
/// attached when it arrived.
fn api_server(lab: &Lab) -> Result<ApiServer> {
    let api = ApiServer::start(lab)?;
    api.set_namespace("default", &[(MODE, "ambient")]);
    for spec in &PODS {
        let labels: &[(&str, &str)] = if spec.name == "plain" {
            &[(MODE, "none")]
        } else {
            &[]
        };
        api.set_pod(spec, labels);
    }
    let places: Vec<Place> = lab
        .pods
        .iter()
        .map(|p| Place {
            pod: p.spec.name.to_string(),
            ip: p.spec.ip,
            ns: lab.nodes[p.spec.node].ns.path(),
            veth: p.veth.clone(),
            pin_dir: lab.nodes[p.spec.node].pin_dir.clone(),
        })
        .collect();
    api.on_patch(move |_, name| match places.iter().find(|p| p.pod == name) {
        Some(p) if capture_in_place(&p.ns, &p.veth, &p.pin_dir, p.ip) => "attached".into(),
        Some(_) => "not attached".into(),
        None => "unknown pod".into(),
    });
    Ok(api)
}

/// Where a pod's capture lives: its veth in the node's namespace and the
/// node's pinned maps.
struct Place {
    pod: String,
    ip: std::net::Ipv4Addr,
    ns: PathBuf,
    veth: String,
    pin_dir: PathBuf,
}

fn ztunnel(s: &Setup, node: &str, kubeconfig: &Path) -> Result<Ztunnel> {
    let kubeconfig = kubeconfig.display().to_string();
    Ztunnel::start_env(
        s.lab.node(node),
        &s.config,
        &s.lab.ca_dir,
        &["--enroll-pods"],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
}

fn sets(p: &PatchRecord) -> bool {
    p.body["metadata"]["annotations"][ANNOTATION] == "enabled"
}

fn removes(p: &PatchRecord) -> bool {
    p.body["metadata"]["annotations"]
        .as_object()
        .is_some_and(|a| a.get(ANNOTATION).is_some_and(|v| v.is_null()))
}

#[test]
fn ambient_pods_are_captured_then_annotated_and_released_when_they_leave() -> Result<()> {
    // The file leaves `bystander` out of the mesh: only the API puts it in.
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let api = api_server(&s.lab)?;
    let kubeconfig = api.kubeconfig()?;
    let mut zt1 = ztunnel(&s, "node1", &kubeconfig)?;
    let zt2 = ztunnel(&s, "node2", &kubeconfig)?;

    let enrolled = ["client", "bystander", "neighbor", "server"];
    let patches = api.wait_for_patches(
        "every ambient pod annotated",
        Duration::from_secs(10),
        |p| {
            enrolled
                .iter()
                .all(|name| p.iter().any(|r| r.name == *name && sets(r)))
        },
    )?;
    for p in &patches {
        assert!(sets(p), "an unexpected patch: {p:?}");
        assert_eq!(
            p.note, "attached",
            "{} was annotated before its capture was attached",
            p.name
        );
    }
    assert!(
        !patches.iter().any(|p| p.name == "plain"),
        "an opted-out pod was annotated"
    );
    assert!(counters(s.lab.node("node2"), s.lab.pod("plain").spec.ip)?.is_none());
    assert_eq!(api.annotations("bystander")[ANNOTATION], "enabled");

    // The pod the API enrolled is in the mesh: its traffic is tunnelled
    // with its identity.
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    request(&s.lab.pod("bystander").ns, server.addr, 1024)?;
    let mut zt2 = zt2;
    zt2.wait_for_log(
        "src_identity=spiffe://cluster.local/ns/default/sa/bystander",
        Duration::from_secs(5),
    )?;

    // A restart neither removes nor re-adds annotations.
    let before = api.patches().len();
    zt1.stop()?;
    let _zt1 = ztunnel(&s, "node1", &kubeconfig)?;
    std::thread::sleep(Duration::from_secs(2));
    let after = api.patches();
    assert_eq!(
        after.len(),
        before,
        "a restart changed annotations: {:#?}",
        &after[before..]
    );

    // The namespace leaves ambient mode: every annotation goes, and the
    // pod only the API had enrolled is released.
    api.set_namespace("default", &[]);
    api.wait_for_patches("annotations removed", Duration::from_secs(10), |p| {
        enrolled
            .iter()
            .all(|name| p.iter().any(|r| r.name == *name && removes(r)))
    })?;
    let bystander = s.lab.pod("bystander").spec.ip;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counters(s.lab.node("node1"), bystander)?.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "bystander is still captured"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The file keeps `client` in the mesh whatever the API says.
    assert!(counters(s.lab.node("node1"), s.lab.pod("client").spec.ip)?.is_some());
    Ok(())
}

#[test]
fn a_pod_that_opts_out_loses_its_annotation_and_its_capture() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let api = api_server(&s.lab)?;
    let kubeconfig = api.kubeconfig()?;
    let _zt1 = ztunnel(&s, "node1", &kubeconfig)?;
    api.wait_for_patches("bystander annotated", Duration::from_secs(10), |p| {
        p.iter().any(|r| r.name == "bystander" && sets(r))
    })?;
    let bystander = PODS.iter().find(|p| p.name == "bystander").copied();
    let bystander = bystander.ok_or_else(|| anyhow::anyhow!("no bystander in the lab"))?;
    api.set_pod(&bystander, &[(MODE, "none")]);
    api.wait_for_patches(
        "the opted-out pod's annotation removed",
        Duration::from_secs(10),
        |p| p.iter().any(|r| r.name == "bystander" && removes(r)),
    )?;
    assert!(api.annotations("bystander").get(ANNOTATION).is_none());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counters(s.lab.node("node1"), bystander.ip)?.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the opted-out pod is still captured"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
