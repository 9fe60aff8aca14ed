//! Waypoints in the lab: ztunnel sends what a destination's waypoint must
//! see through it (and refuses what it cannot), the waypoint applies L7
//! policy and routes, and no client gets around it.
//!
//! The waypoint runs as a pod on node2 (198.18.2.20); `echo` (VIP
//! 198.18.100.10:80) is the server pod, `echo-v2` (198.18.100.11:80) the
//! neighbor pod, both serving HTTP on 8080.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use ztunnel_tests::{
    http::sample,
    lab, peer,
    setup::Setup,
    traffic::Connection,
    waypoint::{self, Backend, Client, BACKEND_PORT, ECHO_VIP, WAYPOINT},
    ztunnel::Ztunnel,
};

/// Istio's L7 policy for the tests: the client may GET anything under
/// /allowed; /allowed/admin is denied to everyone.
const POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client-get
  namespace: default
spec:
  targetRefs:
  - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/client"]}
    to:
    - operation: {methods: ["GET"], paths: ["/allowed*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: default
spec:
  targetRefs:
  - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/allowed/admin"]}
"#;

/// An L4 policy at the server (enforced by its ztunnel): only the
/// waypoint's identity may connect.
const ONLY_FROM_WAYPOINT: &str = "policies:\n- name: only-waypoint\n  namespace: default\n  scope: WorkloadSelector\n  action: Allow\n  dryRun: false\n  rules: [[[{principals: [!Exact cluster.local/ns/default/sa/waypoint]}]]]\n";

struct Mesh {
    s: Setup,
    l7: std::path::PathBuf,
    zt1: Ztunnel,
    zt2: Ztunnel,
    wp: Ztunnel,
    server: Backend,
    neighbor: Backend,
}

impl Mesh {
    fn up(
        echo_waypoint: bool,
        server_waypoint: bool,
        tail: &str,
        l7: &str,
        flags: &[&str],
    ) -> Result<Self> {
        let mut s = Setup::new(&waypoint::config(echo_waypoint, server_waypoint, tail))?;
        s.lab.add_extra_pod(WAYPOINT)?;
        let l7_path = std::env::temp_dir().join(format!("{}-l7.yaml", s.lab.prefix));
        std::fs::write(&l7_path, l7)?;
        let zt1 = s.ztunnel("node1", &[])?;
        let zt2 = s.ztunnel("node2", &[])?;
        let wp = waypoint::start(&s.lab, &s.config, &l7_path, flags)?;
        let server_pod = s.lab.pod("server");
        let server = Backend::start(&server_pod.ns, "server", server_pod.addr(BACKEND_PORT))?;
        let neighbor_pod = s.lab.pod("neighbor");
        let neighbor = Backend::start(
            &neighbor_pod.ns,
            "neighbor",
            neighbor_pod.addr(BACKEND_PORT),
        )?;
        Ok(Mesh {
            s,
            l7: l7_path,
            zt1,
            zt2,
            wp,
            server,
            neighbor,
        })
    }

    fn client(&self, dst: SocketAddr, h2: bool) -> Result<Client> {
        Client::connect(&self.s.lab.pod("client").ns, dst, h2)
    }

    fn waypoint_metrics(&self) -> Result<String> {
        let pod = self.s.lab.pod(WAYPOINT.name);
        Ok(
            ztunnel_tests::http::get(&pod.ns, SocketAddr::from((WAYPOINT.ip, 15020)), "/metrics")?
                .body,
        )
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.l7);
    }
}

fn echo() -> SocketAddr {
    SocketAddr::from((ECHO_VIP, 80))
}

#[test]
fn service_traffic_passes_the_waypoint_which_applies_l7_policy() -> Result<()> {
    let m = Mesh::up(true, false, "", POLICIES, &[])?;
    for h2 in [false, true] {
        let mut c = m.client(echo(), h2)?;
        let ok = c.get("/allowed/page")?;
        assert_eq!(
            (ok.status, ok.body.as_str()),
            (200, "pod=server\n"),
            "h2={h2}"
        );
        let seen = m.server.last().expect("the server saw the request");
        assert_eq!(
            seen.peer.ip(),
            std::net::IpAddr::V4(WAYPOINT.ip),
            "the request must arrive from the waypoint"
        );
        assert_eq!(
            seen.headers.get("x-forwarded-client-cert").map(String::as_str),
            Some("By=spiffe://cluster.local/ns/default/sa/waypoint;URI=spiffe://cluster.local/ns/default/sa/client"),
            "the client's identity travels with the request"
        );
        // Denied: 403 with Envoy's body, and the connection stays usable.
        let before = m.server.requests();
        let denied = c.get("/allowed/admin")?;
        assert_eq!(
            (denied.status, denied.body.as_str()),
            (403, "RBAC: access denied")
        );
        let not_allowed = c.request("POST", "/allowed/page", &[])?;
        assert_eq!(not_allowed.status, 403, "no ALLOW rule matches a POST");
        assert_eq!(
            m.server.requests(),
            before,
            "denied requests must not reach the server"
        );
        assert_eq!(
            c.get("/allowed/again")?.status,
            200,
            "same connection after a 403"
        );
    }
    // A client on the waypoint's own node: ztunnel reaches the waypoint pod
    // on the same node, and its replies find their way back to ztunnel.
    let mut same_node = Client::connect(&m.s.lab.pod("server").ns, echo(), false)?;
    assert_eq!(
        same_node.get("/x").map(|r| r.status).ok(),
        Some(403),
        "server's own identity is not the client's: no ALLOW matches"
    );
    // Forged identity headers from the client are replaced.
    let mut c = m.client(echo(), false)?;
    c.request(
        "GET",
        "/allowed/x",
        &[(
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/default/sa/admin",
        )],
    )?;
    let xfcc = m
        .server
        .last()
        .and_then(|s| s.headers.get("x-forwarded-client-cert").cloned());
    assert!(xfcc.is_some_and(|v| v.ends_with("sa/client") && !v.contains("admin")));

    let metrics = m.waypoint_metrics()?;
    let labels = |code| {
        [
            ("reporter", "waypoint"),
            ("response_code", code),
            ("source_workload", "client"),
            ("destination_service", "echo.default.svc.cluster.local"),
        ]
    };
    assert!(
        sample(&metrics, "istio_requests_total", &labels("200")).unwrap_or(0.0) >= 5.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "istio_requests_total", &labels("403")).unwrap_or(0.0) >= 4.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "istio_request_duration_milliseconds_count",
            &labels("200")
        )
        .unwrap_or(0.0)
            >= 5.0
    );
    assert!(sample(&metrics, "istio_request_bytes_count", &labels("200")).unwrap_or(0.0) >= 5.0);
    assert!(
        m.wp.log_text().contains("path=/allowed/admin"),
        "an access-log line per request"
    );
    Ok(())
}

#[test]
fn no_client_gets_around_the_waypoint() -> Result<()> {
    // The server names the waypoint too, and its ztunnel admits only the
    // waypoint's identity.
    let mut m = Mesh::up(true, true, ONLY_FROM_WAYPOINT, POLICIES, &[])?;
    let server_addr = m.s.lab.pod("server").addr(BACKEND_PORT);
    // A mesh client dialling the pod directly is sent through the waypoint
    // (the workload's own waypoint): policy applies there.
    let mut c = m.client(server_addr, false)?;
    assert_eq!(c.get("/allowed/direct")?.status, 200);
    assert_eq!(c.get("/allowed/admin")?.status, 403);
    assert!(
        m.wp.log_text().contains("path=/allowed/direct"),
        "the pod-addressed request went through the waypoint"
    );

    // A client outside the mesh (plaintext, no identity) reaching the pod
    // directly does not get past the server's ztunnel.
    let before = m.server.requests();
    let plain = m.s.lab.pod("plain");
    let attempt = Connection::open(&plain.ns, server_addr, Duration::from_secs(2))
        .and_then(|c| c.exchange(64));
    assert!(
        attempt.is_err(),
        "a plaintext client reached a waypoint-protected pod directly"
    );
    // Neither does a mesh client whose ztunnel sends it straight (the same
    // node's neighbor, tunnelled by node2's ztunnel, is denied by identity).
    m.zt2
        .wait_for_log("kernel policy tables updated", Duration::from_secs(5))?;
    assert_eq!(
        m.server.requests(),
        before,
        "the server saw a bypassing request"
    );
    let _ = &mut m.zt1;
    Ok(())
}

#[test]
fn an_unreachable_waypoint_refuses_traffic_and_is_reported() -> Result<()> {
    let s = Setup::new(&waypoint::config(true, false, "").replace("/198.18.2.20", "/198.18.2.99"))?;
    let zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Backend::start(&server_pod.ns, "server", server_pod.addr(BACKEND_PORT))?;
    assert!(
        zt1.log_text().contains("service default/echo.default.svc.cluster.local names waypoint /198.18.2.99:15008, which is neither a workload nor a service"),
        "the configuration's unresolvable waypoint is reported:\n{}",
        zt1.log_text()
    );
    let attempt =
        Client::connect(&s.lab.pod("client").ns, echo(), false).and_then(|mut c| c.get("/"));
    assert!(
        attempt.is_err(),
        "traffic for an unreachable waypoint went somewhere: {attempt:?}"
    );
    assert_eq!(
        server.requests(),
        0,
        "the destination was reached around its waypoint"
    );
    assert!(zt1
        .log_text()
        .contains("refused: the destination's waypoint cannot be reached"));
    Ok(())
}

#[test]
fn a_waypoint_serves_only_destinations_that_name_it() -> Result<()> {
    let m = Mesh::up(true, false, "", POLICIES, &[])?;
    let ca = ztunnel::identity::LocalCa::load(&m.s.lab.ca_dir)?;
    let cert = ca.issue(
        &ztunnel::identity::Identity::new("cluster.local", "default", "client"),
        Duration::from_secs(600),
    )?;
    let ns = &m.s.lab.pod("client").ns;
    let wp = SocketAddr::from((WAYPOINT.ip, 15008));
    assert_eq!(
        peer::connect(ns, wp, Some(&cert), &echo().to_string())?,
        peer::Outcome::Status(200)
    );
    // The plain pod names no waypoint: the waypoint must not serve it.
    assert_eq!(
        peer::connect(ns, wp, Some(&cert), "198.18.2.11:8080")?,
        peer::Outcome::Status(400)
    );
    assert!(m.wp.log_text().contains("names no waypoint"));
    // No client certificate: no tunnel.
    assert!(matches!(
        peer::connect(ns, wp, None, &echo().to_string())?,
        peer::Outcome::Refused(_)
    ));
    let _ = lab::NODES;
    Ok(())
}

/// Routes for `echo`: a header picks v2, `/split` is weighted 80/20,
/// `/delay` has a 500 ms budget, `/status` is retried twice on 503.
const ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: echo
  namespace: default
spec:
  parentRefs:
  - {group: "", kind: Service, name: echo, port: 80}
  rules:
  - matches:
    - headers: [{name: x-version, value: v2}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches:
    - headers: [{name: x-version, value: plain}]
    backendRefs: [{name: echo-plain, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /split}
    backendRefs:
    - {name: echo, port: 80, weight: 80}
    - {name: echo-v2, port: 80, weight: 20}
  - matches:
    - path: {type: PathPrefix, value: /delay}
    timeouts: {request: 500ms}
    backendRefs: [{name: echo, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /status}
    retry: {attempts: 2, codes: [503], backoff: 10ms}
    backendRefs: [{name: echo, port: 80}]
"#;

#[test]
fn routes_split_by_weight_match_headers_and_apply_timeouts_and_retries() -> Result<()> {
    let m = Mesh::up(true, false, "", ROUTES, &[])?;
    let mut c = m.client(echo(), false)?;
    assert_eq!(
        c.request("GET", "/any", &[("x-version", "v2")])?.body,
        "pod=neighbor\n"
    );
    // A backend outside the mesh (no 15008 to answer) is reached in plain TCP.
    let plain = m.s.lab.pod("plain");
    let _plain = Backend::start(&plain.ns, "plain", plain.addr(BACKEND_PORT))?;
    assert_eq!(
        c.request("GET", "/any", &[("x-version", "plain")])?.body,
        "pod=plain\n"
    );

    let (mut v1, mut v2) = (0, 0);
    for _ in 0..200 {
        match c.get("/split")?.body.as_str() {
            "pod=server\n" => v1 += 1,
            "pod=neighbor\n" => v2 += 1,
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }
    // 80/20 of 200: far outside chance for a broken split (p < 1e-6).
    assert!(
        (140..=180).contains(&v1) && v1 + v2 == 200,
        "split was {v1}/{v2}"
    );

    let started = std::time::Instant::now();
    assert_eq!(c.get("/delay/3000")?.status, 504);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the route's timeout did not apply"
    );

    let before = m.server.requests();
    assert_eq!(c.get("/status/503")?.status, 503);
    assert_eq!(
        m.server.requests() - before,
        3,
        "one attempt and two retries"
    );
    let before = m.server.requests();
    assert_eq!(c.get("/status/404")?.status, 404);
    assert_eq!(m.server.requests() - before, 1, "404 is not retried");

    // A route is attached: a request no rule matches is not sent anywhere.
    assert_eq!(c.get("/unrouted")?.status, 404);
    assert!(m.wp.log_text().contains("flags=NR"));
    let _ = &m.neighbor;
    Ok(())
}

#[test]
fn l7_config_applies_live_and_a_bad_resource_keeps_the_previous() -> Result<()> {
    let mut m = Mesh::up(true, false, "", POLICIES, &[])?;
    let mut c = m.client(echo(), false)?;
    assert_eq!(c.get("/allowed/new")?.status, 200);
    // A new DENY for /allowed/new applies without a restart.
    std::fs::write(
        &m.l7,
        format!(
            "{POLICIES}---\n{}",
            POLICIES
                .split("---\n")
                .nth(1)
                .unwrap_or("")
                .replace("deny-admin", "deny-new")
                .replace("/allowed/admin", "/allowed/new")
        ),
    )?;
    m.wp.wait_for_log("L7 configuration applied", Duration::from_secs(10))?;
    assert_eq!(c.get("/allowed/new")?.status, 403);

    // A misspelled field is refused, named with its file and field; the
    // previous policies stay in force.
    std::fs::write(
        &m.l7,
        POLICIES.replace("paths: [\"/allowed*\"]", "pathz: [\"/allowed*\"]"),
    )?;
    m.wp.wait_for_log("L7 configuration refused", Duration::from_secs(10))?;
    let log = m.wp.log_text();
    assert!(
        log.contains(&format!("{}: document 1 (AuthorizationPolicy default/allow-client-get): field `spec.rules[0].to[0].operation", m.l7.display())) && log.contains("pathz"),
        "the refusal names the file, resource and field:\n{log}"
    );
    assert_eq!(
        c.get("/allowed/new")?.status,
        403,
        "the previous configuration stays"
    );
    assert_eq!(c.get("/allowed/other")?.status, 200);

    // CUSTOM (external authorization) is refused with a clear message.
    std::fs::write(
        &m.l7,
        POLICIES.replace(
            "action: ALLOW",
            "action: CUSTOM\n  provider: {name: ext-authz}",
        ),
    )?;
    m.wp.wait_for_log(
        "CUSTOM (external authorization) is not supported",
        Duration::from_secs(10),
    )?;
    assert_eq!(c.get("/allowed/new")?.status, 403);
    Ok(())
}

#[test]
fn every_spelling_of_a_denied_path_is_denied() -> Result<()> {
    let m = Mesh::up(true, false, "", POLICIES, &[])?;
    let mut c = m.client(echo(), false)?;
    let before = m.server.requests();
    for spelling in [
        "/allowed/admin",
        "//allowed/admin",
        "/allowed//admin",
        "/allowed/x/../admin",
        "/allowed/./admin",
        "/allowed/%61dmin",
        "/allowed%2Fadmin",
        "/allowed/x/y/../../admin",
    ] {
        assert_eq!(
            c.get(spelling)?.status,
            403,
            "{spelling} got past a DENY on /allowed/admin"
        );
    }
    assert_eq!(m.server.requests(), before);
    // What is allowed reaches the backend in its normalized form.
    assert_eq!(c.get("/allowed/x/../page")?.status, 200);
    assert_eq!(
        m.server.last().map(|s| s.path),
        Some("/allowed/page".to_string())
    );
    Ok(())
}

#[test]
fn the_waypoint_takes_workloads_and_its_certificate_from_the_control_plane() -> Result<()> {
    use ztunnel_tests::controlplane::{self, ControlPlane};
    let mut lab = lab::Lab::up()?;
    lab.add_extra_pod(WAYPOINT)?;
    let config = std::env::temp_dir().join(format!("{}-cp.yaml", lab.prefix));
    let l7 = std::env::temp_dir().join(format!("{}-cp-l7.yaml", lab.prefix));
    std::fs::write(&config, waypoint::config(true, false, ""))?;
    std::fs::write(&l7, POLICIES)?;
    let result = (|| -> Result<()> {
        let cp = ControlPlane::start(&lab, &config, &[])?;
        let _zt1 = controlplane::ztunnel(&lab, cp.address, "node1", &[], &[])?;
        let _zt2 = controlplane::ztunnel(&lab, cp.address, "node2", &[], &[])?;
        let wp = waypoint::start_from_control_plane(&lab, cp.address, &l7)?;
        let server_pod = lab.pod("server");
        let server = Backend::start(&server_pod.ns, "server", server_pod.addr(BACKEND_PORT))?;
        let mut c = Client::connect(&lab.pod("client").ns, echo(), false)?;
        assert_eq!(c.get("/allowed/cp")?.body, "pod=server\n");
        assert_eq!(c.get("/allowed/admin")?.status, 403);
        assert_eq!(server.requests(), 1);
        let log = wp.log_text();
        assert!(
            log.contains("waiting for the control plane's first complete push"),
            "{log}"
        );
        // No --ca-dir was given: the certificate came from the control plane's CA.
        assert!(
            log.contains(
                "certificate issued identity=spiffe://cluster.local/ns/default/sa/waypoint"
            ),
            "{log}"
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&l7);
    result
}

#[test]
fn tcp_that_is_not_http_is_relayed_under_the_waypoints_l4_policy() -> Result<()> {
    use ztunnel_tests::traffic::Server;
    // Binary first bytes: not HTTP, so relayed as bytes.
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let vip = SocketAddr::from((ECHO_VIP, 7000));
    {
        let mut m = Mesh::up(true, false, "", "", &[])?;
        let server_pod = m.s.lab.pod("server");
        let _tcp = Server::start(&server_pod.ns, server_pod.addr(7000))?;
        let report = Connection::open(&m.s.lab.pod("client").ns, vip, Duration::from_secs(5))?
            .exchange_bytes(&payload)?;
        assert_eq!(report.peer.ip(), std::net::IpAddr::V4(WAYPOINT.ip));
        m.wp.wait_for_log("protocol=tcp", Duration::from_secs(5))?;
    }
    // An ALLOW whose only rule has HTTP conditions cannot allow TCP.
    let m = Mesh::up(true, false, "", POLICIES, &[])?;
    let server_pod = m.s.lab.pod("server");
    let tcp = Server::start(&server_pod.ns, server_pod.addr(7000))?;
    let denied = Connection::open(&m.s.lab.pod("client").ns, vip, Duration::from_secs(5))
        .and_then(|c| c.exchange_bytes(&payload));
    assert!(denied.is_err(), "TCP got through an HTTP-only ALLOW");
    assert!(tcp.accepted().is_empty());
    assert!(m.wp.log_text().contains("TCP connection denied"));
    Ok(())
}

#[test]
fn a_service_policy_applies_when_its_pod_is_dialled() -> Result<()> {
    // A DENY aimed at the echo Service; the client dials the server pod,
    // which names the waypoint too.
    let deny_echo = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: echo-no-secret}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: echo}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/allowed/secret\"]}}]}]\n";
    let m = Mesh::up(true, true, "", &format!("{POLICIES}{deny_echo}"), &[])?;
    let mut c = m.client(m.s.lab.pod("server").addr(BACKEND_PORT), false)?;
    assert_eq!(c.get("/allowed/fine")?.status, 200);
    assert_eq!(
        c.get("/allowed/secret")?.status,
        403,
        "dialling the pod dodged the service's DENY"
    );
    Ok(())
}

#[test]
fn sigterm_lets_requests_in_flight_finish() -> Result<()> {
    let mut m = Mesh::up(true, false, "", "", &["--drain-deadline", "10s"])?;
    let mut client_ns = ztunnel_tests::netns::Netns::existing(m.s.lab.pod("client").ns.name());
    client_ns.keep();
    let slow = std::thread::spawn(move || -> Result<u16> {
        let mut c = Client::connect(&client_ns, echo(), false)?;
        Ok(c.get("/delay/1500")?.status)
    });
    std::thread::sleep(Duration::from_millis(500));
    m.wp.terminate();
    std::thread::sleep(Duration::from_millis(200));
    let pod = m.s.lab.pod(WAYPOINT.name);
    let ready = ztunnel_tests::http::get(
        &pod.ns,
        SocketAddr::from((WAYPOINT.ip, 15020)),
        "/healthz/ready",
    )?;
    assert_eq!(ready.status, 503, "readiness fails while draining");
    let status = slow
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    assert_eq!(status, 200, "the request in flight was cut off");
    let exit = m.wp.wait_exit(Duration::from_secs(10))?;
    assert!(exit.success(), "{exit:?}");
    assert!(m
        .wp
        .log_text()
        .contains("drained: every connection finished"));
    Ok(())
}
