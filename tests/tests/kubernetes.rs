//! Pod enrollment from the Kubernetes API (`--enroll-pods`), against a
//! scripted API server: ambient pods are captured, then annotated for
//! istiod, never the other way round; pods that leave ambient mode lose the
//! annotation and their capture; a restart does not flap annotations.

use std::time::Duration;

use anyhow::Result;
use ztunnel_tests::{
    apiserver::{
        api_server, enrolling_ztunnel as ztunnel, MODE_LABEL as MODE, REDIRECTION as ANNOTATION,
    },
    lab::{self, PODS},
    setup::Setup,
    traffic::{request, Server},
    wait::eventually,
    ztunnel::counters,
};

#[test]
fn ambient_pods_are_captured_then_annotated_and_released_when_they_leave() -> Result<()> {
    // The file leaves `bystander` out of the mesh: only the API puts it in.
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let api = api_server(&s.lab, &[])?;
    let kubeconfig = api.kubeconfig()?;
    let mut zt1 = ztunnel(&s, "node1", &kubeconfig, &[])?;
    let zt2 = ztunnel(&s, "node2", &kubeconfig, &[])?;

    let enrolled = ["client", "bystander", "neighbor", "server"];
    let patches = api.wait_for_patches(
        "every ambient pod annotated",
        Duration::from_secs(10),
        |p| {
            enrolled
                .iter()
                .all(|name| p.iter().any(|r| r.name == *name && r.sets_redirection()))
        },
    )?;
    for p in &patches {
        assert!(p.sets_redirection(), "an unexpected patch: {p:?}");
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
    let _zt1 = ztunnel(&s, "node1", &kubeconfig, &[])?;
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
            .all(|name| p.iter().any(|r| r.name == *name && r.removes_redirection()))
    })?;
    let bystander = s.lab.pod("bystander").spec.ip;
    eventually("bystander released", Duration::from_secs(5), || {
        Ok(counters(s.lab.node("node1"), bystander)?.is_none())
    })?;
    // The file keeps `client` in the mesh whatever the API says.
    assert!(counters(s.lab.node("node1"), s.lab.pod("client").spec.ip)?.is_some());
    Ok(())
}

#[test]
fn a_pod_that_opts_out_loses_its_annotation_and_its_capture() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let api = api_server(&s.lab, &[])?;
    let kubeconfig = api.kubeconfig()?;
    let _zt1 = ztunnel(&s, "node1", &kubeconfig, &[])?;
    api.wait_for_patches("bystander annotated", Duration::from_secs(10), |p| {
        p.iter()
            .any(|r| r.name == "bystander" && r.sets_redirection())
    })?;
    let bystander = PODS.iter().find(|p| p.name == "bystander").copied();
    let bystander = bystander.ok_or_else(|| anyhow::anyhow!("no bystander in the lab"))?;
    api.set_pod(&bystander, &[(MODE, "none")]);
    api.wait_for_patches(
        "the opted-out pod's annotation removed",
        Duration::from_secs(10),
        |p| {
            p.iter()
                .any(|r| r.name == "bystander" && r.removes_redirection())
        },
    )?;
    assert!(api.annotations("bystander").get(ANNOTATION).is_none());
    eventually("the opted-out pod released", Duration::from_secs(5), || {
        Ok(counters(s.lab.node("node1"), bystander.ip)?.is_none())
    })?;
    Ok(())
}
