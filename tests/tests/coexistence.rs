//! ztunnel beside the CNI's own TC programs: capture keeps its place in
//! front of them at every hook it holds (a program another agent puts in
//! front is moved behind again), and ztunnel never removes another's
//! program, filter or qdisc, neither at a stop nor at an uninstall.

use std::time::Duration;

use anyhow::Result;
use aya::programs::tc::TcAttachType;
use ztunnel_tests::{
    lab,
    netns::run,
    setup::Setup,
    tcx::{programs, ForeignProgram, Verdict, FOREIGN_NAME},
    traffic::{request, Server},
    wait::eventually,
    ztunnel::{counters, run_to_exit},
};

const POD_INGRESS: &str = "zt_pod_ingress";
const GUARD_EGRESS: &str = "zt_guard_egress";

#[test]
fn capture_stays_first_beside_a_cnis_programs_and_never_removes_them() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let node1 = s.lab.node("node1");
    let client = s.lab.pod("client");
    let (ns, veth) = (node1.ns.path(), client.veth.clone());

    // The CNI was there first: TCX programs at both hooks of the pod's veth
    // and a legacy clsact qdisc with a filter.
    let _cni_in = ForeignProgram::attach(&ns, &veth, TcAttachType::Ingress, Verdict::Next, false)?;
    let _cni_out = ForeignProgram::attach(&ns, &veth, TcAttachType::Egress, Verdict::Next, false)?;
    run(node1
        .ns
        .command("tc")
        .args(["qdisc", "add", "dev", &veth, "clsact"]))?;
    run(node1.ns.command("tc").args([
        "filter", "add", "dev", &veth, "ingress", "u32", "match", "u32", "0", "0",
    ]))?;

    let mut zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    assert_eq!(
        programs(&ns, &veth, TcAttachType::Ingress)?,
        [POD_INGRESS, FOREIGN_NAME]
    );
    assert_eq!(
        programs(&ns, &veth, TcAttachType::Egress)?,
        [GUARD_EGRESS, FOREIGN_NAME]
    );

    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let captured = || -> Result<u64> {
        Ok(counters(node1, client.spec.ip)?
            .unwrap_or_default()
            .outbound_captured)
    };
    let before = captured()?;
    request(&client.ns, server.addr, 1024)?;
    assert_eq!(
        captured()?,
        before + 1,
        "capture did not see the flow beside the CNI's program"
    );

    // The CNI restarts and puts a program in front that ends the chain for
    // every packet: capture moves back in front within seconds. Twice, as
    // the second move starts from the copy the first one attached.
    let mut cni_again = Vec::new();
    for round in 1..=2 {
        cni_again.push(ForeignProgram::attach(
            &ns,
            &veth,
            TcAttachType::Ingress,
            Verdict::Accept,
            true,
        )?);
        eventually("capture first again", Duration::from_secs(5), || {
            Ok(programs(&ns, &veth, TcAttachType::Ingress)?
                .first()
                .map(String::as_str)
                == Some(POD_INGRESS))
        })
        .map_err(|e| anyhow::anyhow!("round {round}: {e}\nztunnel's log:\n{}", zt1.log_text()))?;
        zt1.wait_for_log_count("capture is first again", round, Duration::from_secs(2))?;
    }
    assert_eq!(
        programs(&ns, &veth, TcAttachType::Ingress)?,
        [POD_INGRESS, FOREIGN_NAME, FOREIGN_NAME, FOREIGN_NAME],
        "the CNI's programs must stay, behind capture"
    );
    let before = captured()?;
    request(&client.ns, server.addr, 1024)?;
    assert_eq!(captured()?, before + 1);

    // A stop leaves capture (failing closed) and the CNI's programs; an
    // uninstall removes only ztunnel's.
    zt1.stop()?;
    assert_eq!(
        programs(&ns, &veth, TcAttachType::Ingress)?,
        [POD_INGRESS, FOREIGN_NAME, FOREIGN_NAME, FOREIGN_NAME]
    );
    let out = run_to_exit(node1, &s.config, &s.lab.ca_dir, &["--uninstall"])?;
    assert!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        programs(&ns, &veth, TcAttachType::Ingress)?,
        [FOREIGN_NAME; 3]
    );
    assert_eq!(programs(&ns, &veth, TcAttachType::Egress)?, [FOREIGN_NAME]);
    let qdiscs = run(node1.ns.command("tc").args(["qdisc", "show", "dev", &veth]))?;
    assert!(
        String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "the CNI's qdisc was removed"
    );
    let filters = run(node1
        .ns
        .command("tc")
        .args(["filter", "show", "dev", &veth, "ingress"]))?;
    assert!(
        String::from_utf8_lossy(&filters.stdout).contains("u32"),
        "the CNI's filter was removed"
    );
    Ok(())
}
