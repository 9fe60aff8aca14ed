//! ztunnel: the node proxy of an ambient service mesh.
//!
//! The data path, in the order a captured connection meets it:
//! - [`redirect`]: the TC programs on pods' veths and uplinks hand new TCP
//!   flows to ztunnel's transparent listeners;
//! - [`proxy`]: the listeners relay each flow to its original destination,
//!   keeping the client's address;
//! - [`state`]: the workloads that decide what is captured and where flows go,
//!   loaded by [`config`] from the local file and kept up to date.

pub mod accept;
pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod grpc;
pub mod handover;
pub mod identity;
pub mod k8s;
pub mod metrics;
pub mod protos;
pub mod proxy;
pub mod redirect;
pub mod state;
pub mod tls;
pub mod xds;
