//! The control plane's view of the mesh over xDS: a Delta ADS client for
//! the two resource types Istio's ztunnel subscribes to, feeding the same
//! state the local file feeds.
//!
//! - [`convert`]: resources to and from the local file's types;
//! - [`store`]: the resources held, by name and version, and the
//!   configuration they make;
//! - [`client`]: the stream to the control plane: subscribe, apply, ACK or
//!   NACK, reconnect with backoff.

pub mod client;
pub mod convert;
pub mod store;

pub use client::{NodeIdentity, XdsClient, XdsStatus};

/// Workloads and services (`istio.workload.Address`).
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// L4 authorization policies (`istio.security.Authorization`).
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// The types ztunnel subscribes to, in the order it subscribes.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];
