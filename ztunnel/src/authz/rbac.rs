//! Matching one policy against one connection, with Istio's ztunnel's
//! semantics: a policy matches if any rule matches; a rule if all its
//! clauses match; a clause if any of its matches matches; a match if every
//! field constraint holds, where a field holds if some positive entry
//! matches (or there is none) and no `not` entry matches.

use crate::config::local::{Authorization, RbacMatch, ServiceAccountMatch, StringMatch};

use super::Connection;

/// The connection as policies see it, with the identity's parts worked out
/// once per decision rather than once per match.
pub struct Subject<'a> {
    conn: &'a Connection,
    /// The peer's namespace; "" without an identity.
    namespace: &'a str,
    /// The peer's principal (the SPIFFE id without `spiffe://`), built on
    /// first use: most connections meet no principal match.
    principal: std::cell::OnceCell<Option<String>>,
}

impl<'a> Subject<'a> {
    pub fn new(conn: &'a Connection) -> Self {
        Subject {
            conn,
            namespace: conn
                .src_identity
                .as_ref()
                .map(|i| &*i.namespace)
                .unwrap_or(""),
            principal: std::cell::OnceCell::new(),
        }
    }

    fn principal(&self) -> Option<&str> {
        self.principal
            .get_or_init(|| self.conn.src_identity.as_ref().map(|i| i.principal()))
            .as_deref()
    }
}

/// Whether `policy` matches `subject`.
pub fn policy_matches(policy: &Authorization, subject: &Subject<'_>) -> bool {
    // No rules: the policy never matches.
    policy.rules.iter().any(|rule| {
        // No clauses: the rule matches everything.
        rule.iter().all(|clause| clause_matches(clause, subject))
    })
}

fn clause_matches(clause: &[RbacMatch], subject: &Subject<'_>) -> bool {
    if clause.is_empty() {
        return true;
    }
    // A match with no constraint at all is skipped, not a wildcard.
    clause
        .iter()
        .filter(|m| !is_empty(m))
        .any(|m| match_matches(m, subject))
}

/// Whether `policy` can match any connection without an identity. A match
/// with a positive identity constraint never matches plaintext, so a clause
/// made only of those, and any rule holding such a clause, never does.
pub fn can_match_plaintext(policy: &Authorization) -> bool {
    policy.rules.iter().any(|rule| {
        rule.iter().all(|clause| {
            clause.is_empty()
                || clause.iter().filter(|m| !is_empty(m)).any(|m| {
                    m.namespaces.is_empty()
                        && m.service_accounts.is_empty()
                        && m.principals.is_empty()
                })
        })
    })
}

fn is_empty(m: &RbacMatch) -> bool {
    m.namespaces.is_empty()
        && m.not_namespaces.is_empty()
        && m.service_accounts.is_empty()
        && m.not_service_accounts.is_empty()
        && m.principals.is_empty()
        && m.not_principals.is_empty()
        && m.source_ips.is_empty()
        && m.not_source_ips.is_empty()
        && m.destination_ips.is_empty()
        && m.not_destination_ips.is_empty()
        && m.destination_ports.is_empty()
        && m.not_destination_ports.is_empty()
}

/// Some positive entry matches (or there is none), and no negative one does.
fn field<T>(positive: &[T], negative: &[T], mut predicate: impl FnMut(&T) -> bool) -> bool {
    let pos = positive.is_empty() || positive.iter().any(&mut predicate);
    let neg = negative.is_empty() || !negative.iter().any(&mut predicate);
    pos && neg
}

fn match_matches(m: &RbacMatch, subject: &Subject<'_>) -> bool {
    // Without an identity (plaintext) the namespace is "" and the principal
    // is absent: every positive identity match fails, every `not` one holds.
    let conn = subject.conn;
    let namespace = subject.namespace;
    field(&m.namespaces, &m.not_namespaces, |s| {
        string_matches(s, namespace)
    }) && field(&m.service_accounts, &m.not_service_accounts, |sa| {
        service_account_matches(sa, conn)
    }) && field(&m.principals, &m.not_principals, |s| {
        subject.principal().is_some_and(|p| string_matches(s, p))
    }) && field(&m.source_ips, &m.not_source_ips, |net| {
        net.contains(&conn.src.ip())
    }) && field(&m.destination_ips, &m.not_destination_ips, |net| {
        net.contains(&conn.dst.ip())
    }) && field(&m.destination_ports, &m.not_destination_ports, |p| {
        *p == conn.dst.port()
    })
}

/// Exact, prefix, suffix, or presence (non-empty).
pub fn string_matches(m: &StringMatch, value: &str) -> bool {
    match m {
        StringMatch::Exact(s) => value == s,
        StringMatch::Prefix(s) => value.starts_with(s.as_str()),
        StringMatch::Suffix(s) => value.ends_with(s.as_str()),
        StringMatch::Presence() => !value.is_empty(),
    }
}

fn service_account_matches(m: &ServiceAccountMatch, conn: &Connection) -> bool {
    conn.src_identity.as_ref().is_some_and(|id| {
        *id.namespace == *m.namespace && *id.service_account == *m.service_account
    })
}
