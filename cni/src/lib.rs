//! ztunnel's CNI plugin. The runtime runs it after the cluster's own plugin
//! (chained, as the last entry of the conflist); it tells ztunnel about the
//! new pod over a root-only Unix socket and returns only once ztunnel says
//! the pod's capture is attached (or that the pod is not in ambient mode).
//! Otherwise it fails the pod's setup, so no ambient pod ever runs
//! uncaptured. The same binary installs itself into the node's CNI
//! configuration.

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod spec;
