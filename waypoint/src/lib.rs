//! The waypoint: the mesh's L7 proxy, one per namespace or service account,
//! deployed as an ordinary pod that ztunnel does not capture.
//!
//! Following a request through it:
//! - [`server`]: HBONE in (mTLS with the waypoint's own identity, HTTP/2
//!   CONNECT); each tunnel is served as HTTP/1.1 or HTTP/2, detected per
//!   connection, with bounds on what a client can hold;
//! - [`proxy`]: per request, [`policy`] (Istio `AuthorizationPolicy`),
//!   then [`route`] (Gateway API `HTTPRoute`), then [`upstream`];
//! - [`upstream`]: an endpoint of the chosen service, from the same workload
//!   state ztunnel uses, reached over HBONE with the waypoint's identity;
//! - [`telemetry`]: Istio's request metrics and one access-log line per
//!   request;
//! - [`l7config`]: the policy and route files, watched and applied live.

pub mod app;
pub mod authority;
pub mod l7config;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod request;
pub mod resource;
pub mod route;
pub mod server;
pub mod sniff;
pub mod tcp;
pub mod telemetry;
pub mod upstream;
