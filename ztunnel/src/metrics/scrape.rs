//! What is read when Prometheus scrapes rather than counted as it happens:
//! the kernel's per-pod counters (labelled with the configuration current
//! then), certificate expiry, the control plane client's figures, and the
//! process's.

use std::{sync::Arc, time::SystemTime};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};
use tokio::sync::watch;

use super::{kernel::KernelCounters, labels::Escaped, process};
use crate::{identity::CertManager, state::Snapshot, xds::XdsClient};

/// The scrape-time collector.
pub struct Scrape {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub kernel: Option<KernelCounters>,
    pub certs: Arc<CertManager>,
    pub xds: Option<Arc<XdsClient>>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape")
            .field("kernel", &self.kernel.is_some())
            .field("xds", &self.xds.is_some())
            .finish_non_exhaustive()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(kernel) = &self.kernel {
            let snapshot = self.state.borrow().clone();
            kernel.encode(&snapshot, &mut encoder)?;
        }
        self.encode_certificates(&mut encoder)?;
        if let Some(xds) = &self.xds {
            encode_xds(&xds.status(), &mut encoder)?;
        }
        process::encode(&mut encoder)
    }
}

impl Scrape {
    fn encode_certificates(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "ztunnel_certificate_expiry_seconds",
            "When each workload certificate expires (Unix time)",
            None,
            MetricType::Gauge,
        )?;
        for cert in self.certs.snapshot() {
            let expiry = cert
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            let identity = cert.identity.to_string();
            let labels = [("identity", Escaped(&identity))];
            ConstGauge::new(expiry).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Istio's ztunnel's xDS families, with its names.
fn encode_xds(
    xds: &crate::xds::XdsStatus,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        "istio_xds_connection_terminations",
        "The total number of completed connections to xds server (unstable)",
        None,
        MetricType::Counter,
    )?;
    for (reason, n) in &xds.terminations {
        ConstCounter::new(*n).encode(metric.encode_family(&[("reason", Escaped(reason))])?)?;
    }
    let mut metric = encoder.encode_descriptor(
        "istio_xds_message",
        "Total number of messages received (unstable)",
        None,
        MetricType::Counter,
    )?;
    for (url, t) in &xds.types {
        ConstCounter::new(t.responses).encode(metric.encode_family(&[("url", Escaped(url))])?)?;
    }
    let mut metric = encoder.encode_descriptor(
        "istio_xds_message_bytes",
        "Total number of bytes received (unstable)",
        None,
        MetricType::Counter,
    )?;
    for (url, t) in &xds.types {
        ConstCounter::new(t.bytes).encode(metric.encode_family(&[("url", Escaped(url))])?)?;
    }
    Ok(())
}
