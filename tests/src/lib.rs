//! Test support for kernel-level tests: the lab (network namespaces wired as
//! a two-node cluster), ztunnel processes inside it, and test traffic.

pub mod apiserver;
pub mod cni;
pub mod controlplane;
pub mod hbone_server;
pub mod http;
pub mod lab;
pub mod load;
pub mod netns;
pub mod peer;
pub mod raw;
pub mod served;
pub mod setup;
pub mod sniff;
pub mod tcx;
pub mod traffic;
pub mod tun;
pub mod wait;
pub mod waypoint;
pub mod ztunnel;
