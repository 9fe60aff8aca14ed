//! Which pods ambient mode captures, and the annotation that tells istiod a
//! pod's traffic is captured: Istio's labels and annotation, decided as
//! istio-cni's node agent decides them.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::config::local::CaptureExclusions;

/// Namespaces opt in with it set to `ambient`; pods opt in with
/// `ambient` or out with `none`.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
/// What istiod waits for before it marks a pod HBONE and signs for it.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";
/// A pod's opt-outs from outbound capture: comma-separated ports, and
/// comma-separated IPv4 ranges (CIDR). Named after Istio's sidecar
/// annotations, under this ztunnel's own prefix: those are ignored, so a
/// pod moved from sidecar to ambient mode does not bypass by surprise.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.ztunnel.dev/excludeOutboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.ztunnel.dev/excludeOutboundIPRanges";
/// Set on pods that have a sidecar: those stay out of ambient mode.
const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// Whether `pod`, in `namespace` (if known), is in ambient mode: its own
/// label decides, then its namespace's. Pods on the host's network, pods
/// with a sidecar and pods that have ended are never captured.
pub fn wants_capture(pod: &Pod, namespace: Option<&Namespace>) -> bool {
    let spec_host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let ended = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let has_sidecar = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
    if spec_host_network || ended || has_sidecar {
        return false;
    }
    match label(&pod.metadata.labels, DATAPLANE_MODE_LABEL) {
        Some(DATAPLANE_MODE_NONE) => false,
        Some(DATAPLANE_MODE_AMBIENT) => true,
        _ => namespace.is_some_and(|ns| {
            label(&ns.metadata.labels, DATAPLANE_MODE_LABEL) == Some(DATAPLANE_MODE_AMBIENT)
        }),
    }
}

/// The pod's IPv4 addresses (capture is IPv4 only).
pub fn ipv4_addresses(pod: &Pod) -> Vec<Ipv4Addr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<Ipv4Addr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
        );
    }
    ips.sort();
    ips.dedup();
    ips
}

/// The pod's outbound exclusions, from its annotations. A bad value is an
/// error naming the annotation and the entry; the caller then captures
/// everything (failing closed).
pub fn exclusions(pod: &Pod) -> Result<CaptureExclusions, String> {
    let annotations = pod.metadata.annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let mut out = CaptureExclusions::default();
    let entries = |value: &str| -> Vec<String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect()
    };
    if let Some(value) = get(EXCLUDE_OUTBOUND_PORTS) {
        for entry in entries(value) {
            match entry.parse::<u16>() {
                Ok(port) if port > 0 => out.outbound_ports.push(port),
                _ => {
                    return Err(format!(
                        "{EXCLUDE_OUTBOUND_PORTS}: `{entry}` is not a port (1-65535)"
                    ))
                }
            }
        }
    }
    if let Some(value) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
        for entry in entries(value) {
            let range = entry
                .parse::<ipnet::Ipv4Net>()
                .or_else(|_| entry.parse::<Ipv4Addr>().map(ipnet::Ipv4Net::from))
                .map_err(|_| {
                    format!(
                        "{EXCLUDE_OUTBOUND_IP_RANGES}: `{entry}` is not an IPv4 address or range"
                    )
                })?;
            out.outbound_ip_ranges.push(range.trunc());
        }
    }
    for (key, n) in [
        (EXCLUDE_OUTBOUND_PORTS, out.outbound_ports.len()),
        (EXCLUDE_OUTBOUND_IP_RANGES, out.outbound_ip_ranges.len()),
    ] {
        if n > CaptureExclusions::MAX_PER_KIND {
            return Err(format!(
                "{key}: {n} entries, at most {} are allowed",
                CaptureExclusions::MAX_PER_KIND
            ));
        }
    }
    out.outbound_ports.sort();
    out.outbound_ports.dedup();
    out.outbound_ip_ranges.sort();
    out.outbound_ip_ranges.dedup();
    Ok(out)
}

/// Whether the pod carries the annotation istiod waits for.
pub fn is_annotated(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .is_some_and(|v| v == REDIRECTION_ENABLED)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn namespace(mode: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("default".into()),
                labels: mode.and_then(|m| labels(&[(DATAPLANE_MODE_LABEL, m)])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(mode: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
                labels: mode.and_then(|m| labels(&[(DATAPLANE_MODE_LABEL, m)])),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "fd00::1".into(),
                    },
                    PodIP {
                        ip: "10.0.0.1".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn annotated(pairs: &[(&str, &str)]) -> Pod {
        let mut p = pod(None);
        p.metadata.annotations = labels(pairs);
        p
    }

    #[test]
    fn exclusions_are_read_from_the_annotations_and_checked() {
        assert!(exclusions(&pod(None)).unwrap().is_empty());
        let e = exclusions(&annotated(&[
            (EXCLUDE_OUTBOUND_PORTS, "5432, 6379,5432"),
            (
                EXCLUDE_OUTBOUND_IP_RANGES,
                "10.9.0.0/16,192.0.2.7,10.9.1.2/16",
            ),
        ]))
        .unwrap();
        assert_eq!(e.outbound_ports, vec![5432, 6379]);
        let ranges: Vec<String> = e.outbound_ip_ranges.iter().map(|r| r.to_string()).collect();
        assert_eq!(ranges, vec!["10.9.0.0/16", "192.0.2.7/32"]);
        let bad = exclusions(&annotated(&[(EXCLUDE_OUTBOUND_PORTS, "80,http")])).unwrap_err();
        assert!(
            bad.contains("`http`") && bad.contains(EXCLUDE_OUTBOUND_PORTS),
            "{bad}"
        );
        let zero = exclusions(&annotated(&[(EXCLUDE_OUTBOUND_PORTS, "0")])).unwrap_err();
        assert!(zero.contains("`0`"), "{zero}");
        let v6 = exclusions(&annotated(&[(EXCLUDE_OUTBOUND_IP_RANGES, "fd00::/8")])).unwrap_err();
        assert!(v6.contains("`fd00::/8`"), "{v6}");
        let many: Vec<String> = (1..=40).map(|p| p.to_string()).collect();
        let too_many =
            exclusions(&annotated(&[(EXCLUDE_OUTBOUND_PORTS, &many.join(","))])).unwrap_err();
        assert!(too_many.contains("at most 32"), "{too_many}");
    }

    #[test]
    fn the_pod_label_decides_before_the_namespace() {
        let ambient = namespace(Some("ambient"));
        let plain = namespace(None);
        assert!(wants_capture(&pod(None), Some(&ambient)));
        assert!(!wants_capture(&pod(None), Some(&plain)));
        assert!(!wants_capture(&pod(Some("none")), Some(&ambient)));
        assert!(wants_capture(&pod(Some("ambient")), Some(&plain)));
        assert!(!wants_capture(&pod(None), None));
    }

    #[test]
    fn host_network_sidecar_and_ended_pods_are_never_captured() {
        let ambient = namespace(Some("ambient"));
        let mut p = pod(None);
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert!(!wants_capture(&p, Some(&ambient)));
        let mut p = pod(None);
        p.metadata.annotations = labels(&[(SIDECAR_STATUS_ANNOTATION, "{}")]);
        assert!(!wants_capture(&p, Some(&ambient)));
        let mut p = pod(None);
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(!wants_capture(&p, Some(&ambient)));
    }

    #[test]
    fn only_ipv4_addresses_are_taken() {
        assert_eq!(ipv4_addresses(&pod(None)), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    }
}
