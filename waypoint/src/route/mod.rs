//! Gateway API `HTTPRoute`s (gateway.networking.k8s.io/v1) attached to
//! Kubernetes Services, as GAMMA defines them for meshes: which routes apply
//! to a request for a Service, which rule wins, and which backend it goes to.
//!
//! Parsing lives in `parse.rs`; this file holds the parsed form and the
//! per-request decision.

mod parse;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Method, StatusCode};
use regex::Regex;

use crate::request::RequestInfo;

pub use parse::parse;

pub const KIND: &str = "HTTPRoute";

/// One parsed `HTTPRoute`.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// Only the Service parents; Gateway parents are not this waypoint's.
    parents: Vec<Parent>,
    /// Never empty: an absent `rules` is the API's default rule.
    rules: Vec<Rule>,
}

/// A Service the route attaches to, on one port or (None) on all.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parent {
    namespace: String,
    name: String,
    port: Option<u16>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Never empty: an absent `matches` is one "PathPrefix /" match.
    matches: Vec<Match>,
    /// With their weights; empty means "answer 500".
    backends: Vec<(Backend, u32)>,
    request_timeout: Option<Duration>,
    backend_timeout: Option<Duration>,
    retry: Option<Retry>,
}

/// One `matches[]` entry: every condition must hold.
#[derive(Debug, Clone)]
struct Match {
    path: PathMatch,
    method: Option<Method>,
    /// Deduplicated by name at parse time (the API says the first wins).
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

#[derive(Debug, Clone)]
enum PathMatch {
    Exact(String),
    /// Stored without trailing `/`, so `/` is the empty string.
    Prefix(String),
    /// Anchored at both ends.
    Regex(Regex),
}

#[derive(Debug, Clone)]
enum ValueMatch {
    Exact(String),
    /// Anchored at both ends.
    Regex(Regex),
}

/// What to do with a request a route applies to.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// `namespace/name` of the route, for logs.
    pub route: String,
    /// The chosen backend (already picked by weight).
    pub backend: Backend,
    /// `timeouts.request` of the rule: the whole request including retries.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`: each attempt.
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    /// None: the port the client used.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Response codes that are retried (connection failures are always retried).
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

/// How specific a match is, in the Gateway API's order of precedence:
/// path kind and length, then method, header count, query param count.
/// Larger is more specific.
type Specificity = ((u8, usize), bool, usize, usize);

/// One match of one rule of one route, as seen from one Service.
#[derive(Debug)]
struct Candidate {
    specificity: Specificity,
    /// Index into `Routes::routes`, which is load order (older first).
    route: usize,
    rule: usize,
    matched: usize,
    port: Option<u16>,
    /// The route lives in another namespace than the Service: a GAMMA
    /// "consumer" route, which only governs its own namespace's clients.
    consumer: bool,
}

/// All routes, indexed by the Service they attach to.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<HttpRoute>,
    /// namespace → service name → candidates, most precedent first.
    by_service: HashMap<String, HashMap<String, Vec<Candidate>>>,
}

impl Routes {
    /// `all` in load order (earlier = older, for precedence ties).
    pub fn new(all: Vec<HttpRoute>) -> Routes {
        let mut by_service: HashMap<String, HashMap<String, Vec<Candidate>>> = HashMap::new();
        for (route_index, route) in all.iter().enumerate() {
            for (i, parent) in route.parents.iter().enumerate() {
                // A repeated parentRef would only duplicate candidates.
                if route.parents[..i].contains(parent) {
                    continue;
                }
                let list = by_service
                    .entry(parent.namespace.clone())
                    .or_default()
                    .entry(parent.name.clone())
                    .or_default();
                for (rule_index, rule) in route.rules.iter().enumerate() {
                    for (match_index, m) in rule.matches.iter().enumerate() {
                        list.push(Candidate {
                            specificity: m.specificity(),
                            route: route_index,
                            rule: rule_index,
                            matched: match_index,
                            port: parent.port,
                            consumer: parent.namespace != route.namespace,
                        });
                    }
                }
            }
        }
        // Ties on specificity go to the older route (load order is a total
        // order over routes, so the spec's next tie-break, alphabetical
        // namespace/name, can never be reached), then to rule and match order.
        for list in by_service.values_mut().flat_map(HashMap::values_mut) {
            list.sort_by_key(|c| (Reverse(c.specificity), c.route, c.rule, c.matched));
        }
        Routes {
            routes: all,
            by_service,
        }
    }

    /// The decision for a request addressed to Service `(namespace, name)` on
    /// `port` (the service port the client dialled). `None`: no route is
    /// attached to that service (and port), so the caller sends the request
    /// to the original service. `Some(Err(status))`: a route applies but no
    /// rule matched → 404; or the chosen rule has no backends / all weights
    /// 0 → 500.
    pub fn route(
        &self,
        service: (&str, &str),
        port: u16,
        req: &RequestInfo<'_>,
    ) -> Option<Result<Action, StatusCode>> {
        let all = self.by_service.get(service.0)?.get(service.1)?;
        let on_port = || all.iter().filter(|c| c.port.is_none_or(|p| p == port));
        // GAMMA: a consumer route applies only to clients in the route's
        // namespace, and for them it takes over from the producer routes.
        let own_consumer = |c: &Candidate| {
            c.consumer && Some(self.routes[c.route].namespace.as_str()) == req.source_namespace
        };
        let consumer_wins = on_port().any(own_consumer);
        let mut applicable = on_port()
            .filter(|c| {
                if consumer_wins {
                    own_consumer(c)
                } else {
                    !c.consumer
                }
            })
            .peekable();
        applicable.peek()?;
        let hit = applicable.find(|c| self.rule(c).matches[c.matched].matches(req));
        Some(match hit {
            Some(c) => self.action(c),
            None => Err(StatusCode::NOT_FOUND),
        })
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn rule(&self, c: &Candidate) -> &Rule {
        &self.routes[c.route].rules[c.rule]
    }

    fn action(&self, c: &Candidate) -> Result<Action, StatusCode> {
        let route = &self.routes[c.route];
        let rule = self.rule(c);
        // The API answers 500 when a matched rule has nowhere to send to.
        let backend = pick(&rule.backends).ok_or(StatusCode::INTERNAL_SERVER_ERROR)?;
        Ok(Action {
            route: format!("{}/{}", route.namespace, route.name),
            backend: backend.clone(),
            request_timeout: rule.request_timeout,
            backend_timeout: rule.backend_timeout,
            retry: rule.retry.clone(),
        })
    }
}

/// Weighted random choice; None when every weight is 0 (or there are none).
fn pick(backends: &[(Backend, u32)]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut n = fastrand::u64(0..total);
    for (backend, weight) in backends {
        let weight = u64::from(*weight);
        if n < weight {
            return Some(backend);
        }
        n -= weight;
    }
    None
}

impl Match {
    fn specificity(&self) -> Specificity {
        let path = match &self.path {
            PathMatch::Exact(p) => (2, p.chars().count()),
            PathMatch::Prefix(p) => (1, p.chars().count()),
            // Regex precedence is implementation-specific; like Istio, rank
            // them after every prefix, longer patterns first.
            PathMatch::Regex(r) => (0, r.as_str().chars().count()),
        };
        (
            path,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    fn matches(&self, req: &RequestInfo<'_>) -> bool {
        self.path.matches(req.path)
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, want)| {
                header_value(req.headers, name).is_some_and(|v| want.matches(&v))
            })
            && self
                .query
                .iter()
                .all(|(name, want)| query_value(req.query, name).is_some_and(|v| want.matches(v)))
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            // Element-wise: `/foo` covers `/foo` and `/foo/...`, not `/foobar`.
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(want) => value == want,
            ValueMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// A header's value; repeated headers are joined with `,` as Envoy does.
/// None if absent or not valid text.
fn header_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let mut joined = Cow::Borrowed(values.next()?.to_str().ok()?);
    for value in values {
        let joined = joined.to_mut();
        joined.push(',');
        joined.push_str(value.to_str().ok()?);
    }
    Some(joined)
}

/// The first value of a query parameter, compared raw (not percent-decoded).
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}
