//! The CNI plugin (`ztunnel-cni`), run as a container runtime runs it,
//! after a routed plugin has wired the pod: a new ambient pod's setup
//! returns only once its capture is in the kernel; pods outside ambient
//! mode pass at once; without a ztunnel that confirms, the setup fails and
//! the runtime retries it. No pod of an ambient namespace starts
//! uncaptured.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use serde_json::Value;
use ztunnel_tests::{
    apiserver::{api_server, capture_in_place, enrolling_ztunnel, ApiServer, MODE_LABEL},
    cni::Call,
    lab::{self, PodSpec},
    setup::Setup,
    traffic::{request, Server},
    wait::eventually,
    ztunnel::{counters, Ztunnel},
};

/// A pod the API schedules to node1 while the lab's CNI wires it.
const FRESH: PodSpec = PodSpec {
    name: "fresh",
    node: 0,
    ip: Ipv4Addr::new(198, 18, 1, 30),
    enrolled: false,
    service_account: "fresh",
};

/// A pod in a namespace outside ambient mode.
const OUTSIDER: PodSpec = PodSpec {
    name: "outsider",
    node: 0,
    ip: Ipv4Addr::new(198, 18, 1, 31),
    enrolled: false,
    service_account: "default",
};

fn socket(s: &Setup) -> String {
    format!("/run/ztunnel/{}-node1.cni.sock", s.lab.prefix)
}

/// node1's ztunnel enrolling from `api` and serving the CNI socket.
fn ztunnel(s: &Setup, api: &ApiServer) -> Result<Ztunnel> {
    let kubeconfig = api.kubeconfig()?;
    enrolling_ztunnel(s, "node1", &kubeconfig, &["--cni-socket", &socket(s)])
}

fn error_code(out: &Value) -> u64 {
    out["code"].as_u64().unwrap_or(0)
}

/// ADD for `pod` with a 2 s deadline: ztunnel answers, and refuses
/// (code 100) for the reason `why`.
fn refused_within_2s(sock: &str, pod: &PodSpec, why: &str) -> Result<ztunnel_tests::cni::Outcome> {
    let out = Call {
        timeout_seconds: 2,
        ..Call::add("default", pod, sock)
    }
    .run()?;
    assert!(!out.success);
    assert_eq!(error_code(&out.stdout), 100, "{}", out.stdout);
    let details = out.stdout["details"].as_str().unwrap_or("");
    assert!(details.contains(why), "{details}");
    Ok(out)
}

#[test]
fn a_new_ambient_pod_is_set_up_only_once_its_capture_is_attached() -> Result<()> {
    let mut s = Setup::new(&lab::config_yaml(&[]))?;
    let api = api_server(&s.lab, &[FRESH])?;
    api.set_new_pod("default", &FRESH, &[]);
    let mut zt1 = ztunnel(&s, &api)?;
    let mut zt2 = s.ztunnel("node2", &[])?;

    // The cluster's plugin has wired the pod; then the runtime runs ours.
    s.lab.add_extra_pod(FRESH)?;
    let fresh = s.lab.pod("fresh");
    let sock = socket(&s);
    let call = Call::add("default", &FRESH, &sock).for_lab_pod(fresh);
    let out = call.run()?;
    // The moment it returns, the capture is in the kernel.
    let node1 = s.lab.node("node1");
    let in_place = capture_in_place(&node1.ns.path(), &fresh.veth, &node1.pin_dir, FRESH.ip);
    assert!(out.success, "ADD failed: {}", out.stdout);
    assert!(
        in_place,
        "ADD returned before the pod's capture was in the kernel"
    );
    let mut expected = call.prev_result();
    expected["cniVersion"] = "1.0.0".into();
    assert_eq!(
        out.stdout, expected,
        "a chained plugin passes the previous result on"
    );
    zt1.wait_for_log(
        "CNI: new pod captured before it starts",
        Duration::from_secs(2),
    )?;

    // Annotated for istiod, after the capture.
    let patches = api.wait_for_patches("fresh annotated", Duration::from_secs(10), |p| {
        p.iter().any(|r| r.name == "fresh" && r.sets_redirection())
    })?;
    let patch = patches
        .iter()
        .find(|r| r.name == "fresh")
        .map(|r| r.note.as_str());
    assert_eq!(patch, Some("attached"));

    // Its first connection is already in the mesh, with its identity.
    let server = Server::start(&s.lab.pod("server").ns, s.lab.pod("server").addr(8080))?;
    request(&fresh.ns, server.addr, 1024)?;
    zt2.wait_for_log(
        "src_identity=spiffe://cluster.local/ns/default/sa/fresh",
        Duration::from_secs(5),
    )?;

    // Until the configuration source lists it, its own policies are not
    // known: inbound is refused rather than allowed by default.
    let on_fresh = Server::start(&fresh.ns, fresh.addr(8080))?;
    let client = &s.lab.pod("client").ns;
    assert!(
        request(client, on_fresh.addr, 64).is_err(),
        "a pod known only from the API accepted a connection before its policies were known"
    );
    zt1.wait_for_log(
        "policy=default/ztunnel-pending-workload",
        Duration::from_secs(2),
    )?;
    s.write(&lab::config_yaml_extra(&[], &[], &[FRESH], ""))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while request(client, on_fresh.addr, 64).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "still refused once the source listed the pod"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // DEL: ztunnel forgets the addresses the plugin gave; the API never
    // showed one, so the pod is released.
    let del = Call {
        command: "DEL",
        ..Call::add("default", &FRESH, &sock)
    }
    .run()?;
    assert!(del.success, "DEL failed: {}", del.stdout);
    eventually("the pod released after DEL", Duration::from_secs(5), || {
        Ok(counters(s.lab.node("node1"), FRESH.ip)?.is_none())
    })?;
    Ok(())
}

#[test]
fn pods_outside_ambient_mode_pass_at_once() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let api = api_server(&s.lab, &[])?;
    api.set_namespace("plain-ns", &[]);
    api.set_new_pod("plain-ns", &OUTSIDER, &[]);
    let _zt1 = ztunnel(&s, &api)?;
    let sock = socket(&s);
    let out = Call::add("plain-ns", &OUTSIDER, &sock).run()?;
    assert!(out.success, "{}", out.stdout);
    assert!(out.took < Duration::from_secs(2), "took {:?}", out.took);
    assert!(counters(s.lab.node("node1"), OUTSIDER.ip)?.is_none());

    // An opted-out pod of an ambient namespace passes too.
    api.set_new_pod("default", &OUTSIDER, &[(MODE_LABEL, "none")]);
    let out = Call::add("default", &OUTSIDER, &sock).run()?;
    assert!(out.success, "{}", out.stdout);
    assert!(counters(s.lab.node("node1"), OUTSIDER.ip)?.is_none());
    Ok(())
}

#[test]
fn without_a_confirmation_from_ztunnel_the_setup_fails() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let sock = socket(&s);

    // No ztunnel (starting, restarting, after a reboot): try again later.
    let out = Call::add("default", &FRESH, &sock).run()?;
    assert!(!out.success);
    assert_eq!(error_code(&out.stdout), 11, "{}", out.stdout);
    let details = out.stdout["details"].as_str().unwrap_or("");
    assert!(
        details.contains("default/fresh") && details.contains(&sock),
        "{details}"
    );
    // ... except for the namespaces the installer exempts.
    let exempt = Call {
        exclude_namespaces: &["kube-system"],
        ..Call::add("kube-system", &FRESH, &sock)
    }
    .run()?;
    assert!(exempt.success, "{}", exempt.stdout);
    // A DEL never fails.
    assert!(
        Call {
            command: "DEL",
            ..Call::add("default", &FRESH, &sock)
        }
        .run()?
        .success
    );

    let api = api_server(&s.lab, &[])?;
    let _zt1 = ztunnel(&s, &api)?;
    // A pod the API never showed on this node: refused, in time.
    let ghost = refused_within_2s(&sock, &FRESH, "has not shown this pod")?;
    assert!(ghost.took < Duration::from_secs(3), "took {:?}", ghost.took);

    // An ambient pod whose network capture cannot find (no route to it on
    // the node): its setup fails instead of it running uncaptured.
    api.set_new_pod("default", &FRESH, &[]);
    refused_within_2s(&sock, &FRESH, "capture was not in place")?;

    // A new pod given an address capture still holds for an earlier pod
    // (here `neighbor`'s, on its veth): the capture of the earlier pod's
    // veth does not count for the new one's.
    const SUCCESSOR: PodSpec = PodSpec {
        name: "successor",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 1, 12),
        enrolled: false,
        service_account: "successor",
    };
    api.set_new_pod("default", &SUCCESSOR, &[]);
    refused_within_2s(&sock, &SUCCESSOR, "capture was not in place")?;

    // Only root may talk to ztunnel's CNI socket.
    let nobody = Call {
        uid: Some(65534),
        ..Call::add("default", &FRESH, &sock)
    }
    .run()?;
    assert!(!nobody.success);
    assert_eq!(error_code(&nobody.stdout), 11, "{}", nobody.stdout);
    Ok(())
}
