//! L4 authorization with Istio's ztunnel's semantics.
//!
//! - [`rbac`]: whether one policy matches one connection;
//! - [`PolicyStore`]: the policies, indexed by the scopes that select them;
//! - [`evaluate`]: the decision for a connection to a workload;
//! - [`kernel`]: the identity-free part of the decisions, compiled into the
//!   kernel's policy tables.
//!
//! Decisions apply to inbound connections. HBONE ones carry the peer's
//! verified identity; plaintext ones carry none, so identity clauses fail
//! for them (and `not` identity clauses hold).

pub mod kernel;
pub mod rbac;

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tracing::info;

use crate::{
    config::local::{Authorization, RbacAction, RbacScope},
    identity::Identity,
    state::Workload,
};

/// What a decision looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub src: SocketAddr,
    /// The destination workload's address and the real target port (never 15008).
    pub dst: SocketAddr,
    /// The verified peer identity; `None` for plaintext.
    pub src_identity: Option<Identity>,
}

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A deny policy (`namespace/name`) matched.
    ExplicitlyDenied(String),
    /// Allow policies apply and none matched.
    NotAllowed,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::ExplicitlyDenied(key) => write!(f, "explicitly denied by: {key}"),
            Denial::NotAllowed => f.write_str("allow policies exist, but none allowed"),
        }
    }
}

impl Denial {
    /// The policy to name in logs.
    pub fn policy(&self) -> &str {
        match self {
            Denial::ExplicitlyDenied(key) => key,
            Denial::NotAllowed => "-",
        }
    }
}

/// The policies, indexed by scope: `Global` under the namespace "",
/// `Namespace` under the policy's namespace, every policy by key
/// (`namespace/name`) for workloads that select it.
#[derive(Debug, Default)]
pub struct PolicyStore {
    by_namespace: HashMap<String, Vec<Arc<Authorization>>>,
    by_key: HashMap<String, Arc<Authorization>>,
}

/// A policy's key.
pub fn key_of(policy: &Authorization) -> String {
    format!("{}/{}", policy.namespace, policy.name)
}

impl PolicyStore {
    pub fn new(policies: &[Authorization]) -> Self {
        let mut store = PolicyStore::default();
        for policy in policies {
            let policy = Arc::new(policy.clone());
            match policy.scope {
                RbacScope::Global => store
                    .by_namespace
                    .entry(String::new())
                    .or_default()
                    .push(policy.clone()),
                RbacScope::Namespace => store
                    .by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(policy.clone()),
                RbacScope::WorkloadSelector => {}
            }
            store.by_key.insert(key_of(&policy), policy);
        }
        store
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The policies that apply to connections to `workload`: its
    /// namespace's, the global ones, and those it selects.
    pub fn in_scope<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
        let namespace = self
            .by_namespace
            .get(&workload.namespace)
            .into_iter()
            .flatten();
        let global = self.by_namespace.get("").into_iter().flatten();
        let selected = workload
            .authorization_policies
            .iter()
            .filter_map(|k| self.by_key.get(k));
        namespace.chain(global).chain(selected)
    }
}

/// The decision for `conn` to `workload`. Dry-run policies are evaluated and
/// logged but never change it.
pub fn evaluate(store: &PolicyStore, workload: &Workload, conn: &Connection) -> Result<(), Denial> {
    let subject = rbac::Subject::new(conn);
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    let mut dry_deny = Vec::new();
    let mut dry_allow = Vec::new();
    for policy in store.in_scope(workload) {
        match (policy.action, policy.dry_run) {
            (RbacAction::Deny, false) => deny.push(policy),
            (RbacAction::Allow, false) => allow.push(policy),
            (RbacAction::Deny, true) => dry_deny.push(policy),
            (RbacAction::Allow, true) => dry_allow.push(policy),
        }
    }
    for policy in &dry_deny {
        if rbac::policy_matches(policy, &subject) {
            info!(policy = %key_of(policy), src = %conn.src, dst = %conn.dst, "dry-run: deny policy match");
        }
    }
    for policy in &deny {
        if rbac::policy_matches(policy, &subject) {
            return Err(Denial::ExplicitlyDenied(key_of(policy)));
        }
    }
    let mut dry_allow_matched = false;
    for policy in &dry_allow {
        if rbac::policy_matches(policy, &subject) {
            dry_allow_matched = true;
            info!(policy = %key_of(policy), src = %conn.src, dst = %conn.dst, "dry-run: allow policy match");
        }
    }
    if allow.is_empty() {
        if !dry_allow.is_empty() && !dry_allow_matched {
            info!(src = %conn.src, dst = %conn.dst, "dry-run: no allow policies match");
        }
        return Ok(());
    }
    if allow
        .iter()
        .any(|policy| rbac::policy_matches(policy, &subject))
    {
        return Ok(());
    }
    Err(Denial::NotAllowed)
}

/// Whether `evaluate` would log anything for connections to `workload`:
/// the kernel must then leave its connections to userspace.
pub fn has_dry_run(store: &PolicyStore, workload: &Workload) -> bool {
    store.in_scope(workload).any(|p| p.dry_run)
}
