//! Operating ztunnel: metrics, config dump, readiness, drain, zero-downtime
//! restart, and what bad HTTP requests to its ports get.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ztunnel_tests::{
    http::{self, sample},
    lab::{self, PodSpec},
    setup::Setup,
    traffic::{request, Connection, Server},
};

fn node_addr(s: &Setup, node: &str, port: u16) -> SocketAddr {
    SocketAddr::from((s.lab.node(node).underlay_ip, port))
}

fn metrics(s: &Setup, node: &str) -> Result<String> {
    let r = http::get(&s.lab.node(node).ns, node_addr(s, node, 15020), "/metrics")?;
    anyhow::ensure!(r.status == 200, "metrics answered {}", r.status);
    Ok(r.body)
}

const LOCALHOST_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);

#[test]
fn metrics_report_istio_series_and_kernel_drops() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(&[], &[], "policies:\n- name: require-mtls\n  namespace: default\n  scope: Namespace\n  action: Allow\n  dryRun: false\n  rules: [[[{principals: [!Prefix cluster.local/]}]]]\n",
    ))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let client = s.lab.pod("client");

    // Bytes show up while a transfer runs, not only when it closes.
    let held = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    let partial: Vec<u8> = vec![7u8; 300 * 1024];
    let held = {
        let mut conn = held;
        conn.write_all(&partial)?;
        conn
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(&s, "node2")?;
        let received = sample(
            &m,
            "istio_tcp_received_bytes_total",
            &[("reporter", "destination"), ("source_workload", "client")],
        )
        .unwrap_or(0.0);
        if received >= partial.len() as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bytes of an open connection never showed: {received}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = held.exchange_rest(1 << 20, &partial)?;
    let total = (partial.len() + (1 << 20)) as f64;
    assert_eq!(report.bytes as f64, total);

    // Three plaintext attempts from a pod without identity: dropped in the kernel.
    let plain = s.lab.pod("plain");
    for _ in 0..3 {
        assert!(Connection::open(&plain.ns, server.addr, Duration::from_millis(700)).is_err());
    }

    for (node, reporter) in [("node1", "source"), ("node2", "destination")] {
        let m = metrics(&s, node)?;
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("source_app", "client"),
            ("source_version", "v1"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "default"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/server",
            ),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let get = |name| {
            sample(&m, name, &labels)
                .with_context(|| format!("{node}: no {name} with {labels:?}:\n{m}"))
        };
        assert_eq!(get("istio_tcp_connections_opened_total")?, 1.0, "{node}");
        assert_eq!(get("istio_tcp_connections_closed_total")?, 1.0, "{node}");
        // Istio's directions (Envoy's): received is what the client sent,
        // sent is what went back to it.
        let received = get("istio_tcp_received_bytes_total")?;
        assert!(
            (total..=total + 64.0 * 1024.0).contains(&received),
            "{node}: received {received}, expected the client's {total}"
        );
        let sent = get("istio_tcp_sent_bytes_total")?;
        assert!(
            sent > 0.0 && sent < 1024.0,
            "{node}: sent {sent} (the server's one-line report)"
        );
        assert!(
            m.contains("istio_tcp_received_bytes_total{reporter=\""),
            "{node}: families missing"
        );
    }
    let m = metrics(&s, "node2")?;
    let dropped = sample(
        &m,
        "ztunnel_kernel_syn_dropped_total",
        &[("workload", "server"), ("reason", "policy")],
    );
    assert_eq!(
        dropped,
        Some(3.0),
        "kernel drops do not match the 3 denied SYNs:\n{m}"
    );
    assert!(
        sample(
            &m,
            "ztunnel_kernel_flows_captured_total",
            &[("workload", "server"), ("direction", "inbound")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(sample(
        &m,
        "ztunnel_certificate_expiry_seconds",
        &[("identity", "spiffe://cluster.local/ns/default/sa/server")]
    )
    .is_some());
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(sample(&m, name, &[]).is_some(), "no {name}");
    }
    // Same text on Istio's other path.
    let r = http::get(
        &s.lab.node("node2").ns,
        node_addr(&s, "node2", 15020),
        "/stats/prometheus",
    )?;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("istio_tcp_connections_opened_total"));
    Ok(())
}

#[test]
fn denials_and_failed_connects_are_counted_with_istios_response_flags() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(&[], &[], "policies:\n- name: deny-client-9090\n  namespace: default\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}], [{destinationPorts: [9090]}]]]\n",
    ))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let client = s.lab.pod("client");
    let _allowed = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let _denied = Server::start(&server_pod.ns, server_pod.addr(9090))?;
    // Denied at the destination (its ztunnel answers 401)...
    request(&client.ns, server_pod.addr(9090), 64).expect_err("the policy denies 9090");
    // ...and a port where nothing listens (503).
    request(&client.ns, server_pod.addr(8081), 64).expect_err("nothing listens on 8081");
    request(&client.ns, server_pod.addr(8080), 64)?;
    for (node, reporter) in [("node1", "source"), ("node2", "destination")] {
        let m = metrics(&s, node)?;
        let count = |name: &str, flags: &str| {
            sample(
                &m,
                name,
                &[
                    ("reporter", reporter),
                    ("source_workload", "client"),
                    ("destination_workload", "server"),
                    ("response_flags", flags),
                ],
            )
            .unwrap_or(0.0)
        };
        for flags in ["DENY", "CONNECT"] {
            assert_eq!(
                count("istio_tcp_connections_failed_total", flags),
                1.0,
                "{node}: failed with {flags}:\n{m}"
            );
            assert_eq!(
                count("istio_tcp_connections_closed_total", flags),
                1.0,
                "{node}: closed with {flags}"
            );
        }
        // Opened before anything was known, as Istio counts them.
        assert_eq!(
            count("istio_tcp_connections_opened_total", "-"),
            3.0,
            "{node}"
        );
        assert_eq!(
            count("istio_tcp_connections_failed_total", "-"),
            0.0,
            "{node}"
        );
    }
    Ok(())
}

#[test]
fn config_dump_shows_every_enrolled_attachment() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(&[], &[], ""))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let r = http::get(&s.lab.node("node1").ns, LOCALHOST_ADMIN, "/config_dump")?;
    assert_eq!(r.status, 200);
    let dump: serde_json::Value =
        serde_json::from_str(&r.body).context("config_dump is not JSON")?;
    assert_eq!(
        dump["workloads"].as_array().map(Vec::len),
        Some(lab::PODS.len())
    );
    assert!(dump["certificates"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    let pods = dump["capture"]["pods"]
        .as_array()
        .context("no capture.pods")?;
    for name in ["client", "neighbor"] {
        let pod = s.lab.pod(name);
        let entry = pods
            .iter()
            .find(|p| p["ip"] == pod.spec.ip.to_string())
            .with_context(|| format!("{name} missing from {pods:?}"))?;
        assert_eq!(entry["interface"], pod.veth.as_str());
        assert!(entry["ifindex"].as_u64().is_some_and(|i| i > 0));
        assert_eq!(entry["attached"], true);
        assert_eq!(entry["captured"], true);
    }
    assert!(dump["capture"]["uplinks"]
        .as_array()
        .is_some_and(|u| u.iter().any(|i| i == "eth0")));
    Ok(())
}

#[test]
fn readiness_waits_for_every_enrolled_pod() -> Result<()> {
    let late = PodSpec {
        name: "late",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 1, 50),
        enrolled: true,
        service_account: "late",
    };
    let tail = "- uid: lab//v1/Pod/default/late\n  name: late\n  namespace: default\n  serviceAccount: late\n  workloadIps: [\"198.18.1.50\"]\n  protocol: HBONE\n  node: node1\n  services: {}\n";
    let mut s = Setup::new(&lab::config_yaml_with(&[], &[], tail))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let node1 = s.lab.node("node1");
    let ready = http::get(&node1.ns, node_addr(&s, "node1", 15021), "/healthz/ready")?;
    assert_eq!(
        ready.status, 503,
        "ready while an enrolled pod has no capture"
    );
    assert!(
        ready.body.contains("198.18.1.50"),
        "the reason does not name the pod: {}",
        ready.body
    );
    // The pod's sandbox appears; ztunnel finds its veth on the next resync.
    s.lab.add_extra_pod(late)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http::get(
            &s.lab.node("node1").ns,
            node_addr(&s, "node1", 15021),
            "/healthz/ready",
        )?;
        if r.status == 200 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never ready: {}", r.body);
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn sigterm_answers_probes_with_503_lets_a_transfer_finish_then_exits_zero() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(&[], &[], ""))?;
    let mut zt1 = s.ztunnel("node1", &["--drain-deadline", "20s"])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let client = s.lab.pod("client");
    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let transfer =
        std::thread::spawn(move || conn.exchange_slowly(&data, 30, Duration::from_millis(100)));
    std::thread::sleep(Duration::from_millis(500));
    zt1.terminate();
    zt1.wait_for_log("draining", Duration::from_secs(5))?;
    // Through the drain, probes get an answer (503), not a refused connection,
    // and the last scrapes still work.
    let ns = &s.lab.node("node1").ns;
    for _ in 0..3 {
        let r = http::get(ns, node_addr(&s, "node1", 15021), "/healthz/ready")?;
        assert_eq!((r.status, r.body.as_str()), (503, "not ready: draining\n"));
        assert_eq!(metrics(&s, "node1").map(|_| ())?, ());
        std::thread::sleep(Duration::from_millis(300));
    }
    let report = transfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
    assert_eq!(report.bytes, 4 * 1024 * 1024);
    let status = zt1.wait_exit(Duration::from_secs(15))?;
    assert!(status.success(), "exit status {status}");
    assert!(zt1
        .log_text()
        .contains("drained: every connection finished"));
    Ok(())
}

#[test]
fn restart_under_load_drops_nothing() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(&[], &[], ""))?;
    let mut old1 = s.ztunnel("node1", &["--drain-deadline", "20s"])?;
    let mut old2 = s.ztunnel("node2", &["--drain-deadline", "20s"])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let client = s.lab.pod("client");

    // Long-lived connections that span both restarts.
    let long: Vec<_> = (0..3)
        .map(|_| Connection::open(&client.ns, server.addr, Duration::from_secs(5)))
        .collect::<Result<_>>()?;
    let long_threads: Vec<_> = long
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let data = vec![1u8; 2 * 1024 * 1024];
                c.exchange_slowly(&data, 40, Duration::from_millis(150))
            })
        })
        .collect();

    // Continuous new connections.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        let ns_name = client.ns.name().to_string();
        let addr = server.addr;
        std::thread::spawn(move || {
            let ns = ztunnel_tests::netns::Netns::existing(&ns_name);
            while !stop.load(Ordering::SeqCst) {
                match request(&ns, addr, 8 * 1024) {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
                }
            }
            // Not ours to delete.
            std::mem::forget(ns);
        })
    };

    std::thread::sleep(Duration::from_secs(1));
    let new1 = s.ztunnel("node1", &["--drain-deadline", "20s"])?;
    assert!(
        new1.log_text().contains("took the listeners over"),
        "node1 did not hand over:\n{}",
        new1.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    let new2 = s.ztunnel("node2", &["--drain-deadline", "20s"])?;
    assert!(new2.log_text().contains("took the listeners over"));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    load.join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))?;

    let failures = failures.lock().unwrap().clone();
    let done = done.load(Ordering::SeqCst);
    assert!(
        done > 20,
        "too little load to prove anything: {done} connections"
    );
    assert!(
        failures.is_empty(),
        "{} of {} connections failed during the restarts: {:?}",
        failures.len(),
        done + failures.len(),
        &failures[..failures.len().min(5)]
    );
    for t in long_threads {
        let report = t
            .join()
            .map_err(|_| anyhow::anyhow!("long connection thread panicked"))??;
        assert_eq!(
            report.bytes,
            2 * 1024 * 1024,
            "a long-lived connection was cut"
        );
    }
    // The old processes leave once their connections are done.
    for old in [&mut old1, &mut old2] {
        let status = old.wait_exit(Duration::from_secs(25))?;
        assert!(status.success(), "old ztunnel exited with {status}");
    }
    eprintln!("{done} connections during two restarts, 0 failed");
    // The new ones serve on.
    request(&client.ns, server.addr, 1024)?;
    drop((new1, new2));
    Ok(())
}

#[test]
fn bad_http_requests_get_the_documented_4xx_and_change_nothing() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(&[], &[], ""))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let ns = &s.lab.node("node1").ns;
    let metrics = node_addr(&s, "node1", 15020);
    let ready = node_addr(&s, "node1", 15021);
    let cases: Vec<(SocketAddr, &str, &str, u16)> = vec![
        (LOCALHOST_ADMIN, "GET", "/nope", 404),
        (LOCALHOST_ADMIN, "DELETE", "/config_dump", 405),
        (LOCALHOST_ADMIN, "GET", "/quitquitquit", 405),
        (LOCALHOST_ADMIN, "POST", "/logging", 400),
        // Changes go to the admin socket only.
        (LOCALHOST_ADMIN, "POST", "/logging?level=debug", 403),
        (LOCALHOST_ADMIN, "POST", "/quitquitquit", 403),
        (metrics, "GET", "/metricz", 404),
        (metrics, "POST", "/metrics", 405),
        (ready, "GET", "/healthz/live", 404),
        (ready, "PUT", "/healthz/ready", 405),
    ];
    for (addr, method, path, want) in cases {
        let r = http::request(ns, addr, method, path)?;
        assert_eq!(r.status, want, "{method} {path} on {addr}: {}", r.body);
    }
    // Oversized headers.
    for addr in [LOCALHOST_ADMIN, metrics, ready] {
        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let r = http::raw(ns, addr, big.into_bytes())?;
        assert_eq!(r.status, 431, "oversized headers on {addr}: {}", r.body);
    }
    // Garbage that is not HTTP at all.
    for addr in [LOCALHOST_ADMIN, metrics, ready] {
        let r = http::raw(ns, addr, b"\x16\x03\x01 not http\r\n\r\n".to_vec())?;
        assert_eq!(
            r.status, 400,
            "bytes that are not HTTP on {addr}: {}",
            r.body
        );
    }
    // Nothing changed: still ready, still serving, still capturing.
    assert_eq!(http::get(ns, ready, "/healthz/ready")?.status, 200);
    assert_eq!(http::get(ns, metrics, "/metrics")?.status, 200);
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    request(&s.lab.pod("client").ns, server.addr, 1024)?;
    Ok(())
}
