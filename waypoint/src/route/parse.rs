//! From a YAML document to an `HttpRoute`. Serde checks the shape (refusing
//! unknown fields, so a misspelling cannot silently change routing, with the
//! path of the offending field); the functions below check the rest and
//! name their field the same way.

use std::time::Duration;

use http::{HeaderName, Method};
use regex::Regex;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{Backend, HttpRoute, Match, Parent, PathMatch, Retry, Rule, ValueMatch, KIND};
use crate::resource::FieldError;

const API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];
const MAX_WEIGHT: u32 = 1_000_000;
/// `retry.attempts` is implementation-specific when absent; Istio uses 2.
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Istio's default retry backoff.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// The methods `HTTPRouteMatch.method` allows.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDoc {
    api_version: String,
    kind: String,
    metadata: RawMeta,
    spec: RawSpec,
    #[serde(rename = "status", default)]
    _status: Option<IgnoredAny>,
}

use crate::resource::ObjectMeta as RawMeta;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    parent_refs: Option<Vec<RawParentRef>>,
    /// Ignored: a mesh route is selected by the Service it is attached to.
    #[serde(rename = "hostnames", default)]
    _hostnames: Option<IgnoredAny>,
    rules: Option<Vec<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawParentRef {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    section_name: Option<String>,
    port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    #[serde(rename = "name", default)]
    _name: Option<IgnoredAny>,
    matches: Option<Vec<RawMatch>>,
    /// Any content: refused later with a clearer message than serde's.
    filters: Option<Vec<IgnoredAny>>,
    backend_refs: Option<Vec<RawBackendRef>>,
    timeouts: Option<RawTimeouts>,
    retry: Option<RawRetry>,
    session_persistence: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMatch {
    path: Option<RawPath>,
    headers: Option<Vec<RawValueMatch>>,
    query_params: Option<Vec<RawValueMatch>>,
    method: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPath {
    #[serde(rename = "type", default)]
    kind: PathType,
    value: Option<String>,
}

#[derive(Deserialize, Default)]
enum PathType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValueMatch {
    #[serde(rename = "type", default)]
    kind: ValueType,
    name: String,
    value: String,
}

#[derive(Deserialize, Default)]
enum ValueType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    weight: Option<i64>,
    filters: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTimeouts {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<i64>,
    codes: Option<Vec<i64>>,
    backoff: Option<String>,
}

/// `at.field` is wrong in the way `message` says.
fn invalid(at: &str, field: &str, message: impl Into<String>) -> FieldError {
    FieldError::new(format!("{at}.{field}"), message)
}

/// Parses one YAML document of kind HTTPRoute (whole document: apiVersion,
/// kind, metadata, spec). Errors name the field path from the document root,
/// e.g. `spec.rules[0].backendRefs[1].weight`.
pub fn parse(doc: serde_yaml::Value) -> Result<HttpRoute, FieldError> {
    let raw: RawDoc = serde_path_to_error::deserialize(doc)
        .map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))?;
    if !API_VERSIONS.contains(&raw.api_version.as_str()) {
        return Err(FieldError::new(
            "apiVersion",
            format!("expected {}", API_VERSIONS[0]),
        ));
    }
    if raw.kind != KIND {
        return Err(FieldError::new("kind", format!("expected {KIND}")));
    }
    let name = match raw.metadata.name {
        Some(name) if !name.is_empty() => name,
        Some(_) => return Err(invalid("metadata", "name", "must not be empty")),
        None => return Err(invalid("metadata", "name", "missing")),
    };
    let ns = raw.metadata.namespace.filter(|ns| !ns.is_empty());
    let ns = ns.unwrap_or_else(|| "default".to_owned());

    let mut parents = Vec::new();
    for (i, p) in raw
        .spec
        .parent_refs
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        parents.extend(service_parent(p, &ns, &format!("spec.parentRefs[{i}]"))?);
    }
    let mut raw_rules = raw.spec.rules.unwrap_or_default();
    if raw_rules.is_empty() {
        // The API's default: one rule matching everything, with no backends.
        raw_rules.push(RawRule::default());
    }
    let rules = raw_rules.into_iter().enumerate();
    let rules = rules.map(|(i, r)| rule(r, &ns, &format!("spec.rules[{i}]")));
    Ok(HttpRoute {
        name,
        rules: rules.collect::<Result<_, _>>()?,
        namespace: ns,
        parents,
    })
}

/// The Service this parentRef names, or None for other parents (Gateways),
/// which are not this waypoint's to serve.
fn service_parent(p: RawParentRef, ns: &str, at: &str) -> Result<Option<Parent>, FieldError> {
    let core_group = p.group.as_deref().is_none_or(str::is_empty);
    if !core_group || p.kind.as_deref() != Some("Service") {
        return Ok(None);
    }
    if p.name.is_empty() {
        return Err(invalid(at, "name", "must not be empty"));
    }
    // For a Service, sectionName names a port; we only know port numbers,
    // and attaching to every port instead would be wider than asked.
    if p.section_name.is_some() {
        let message = "sectionName is not supported for Service parents; use port";
        return Err(invalid(at, "sectionName", message));
    }
    Ok(Some(Parent {
        namespace: p.namespace.unwrap_or_else(|| ns.to_owned()),
        name: p.name,
        port: nonzero_port(p.port, at)?,
    }))
}

fn rule(raw: RawRule, ns: &str, at: &str) -> Result<Rule, FieldError> {
    refuse_filters(raw.filters, at)?;
    if raw.session_persistence.is_some() {
        let message = "sessionPersistence is not supported yet";
        return Err(invalid(at, "sessionPersistence", message));
    }
    let mut matches = Vec::new();
    for (i, m) in raw.matches.unwrap_or_default().into_iter().enumerate() {
        matches.push(request_match(m, &format!("{at}.matches[{i}]"))?);
    }
    if matches.is_empty() {
        matches.push(request_match(RawMatch::default(), at)?);
    }
    let mut backends = Vec::new();
    for (i, b) in raw.backend_refs.unwrap_or_default().into_iter().enumerate() {
        backends.push(backend(b, ns, &format!("{at}.backendRefs[{i}]"))?);
    }
    let at_timeouts = format!("{at}.timeouts");
    let (request_timeout, backend_timeout) = timeouts(raw.timeouts, &at_timeouts)?;
    Ok(Rule {
        matches,
        backends,
        request_timeout,
        backend_timeout,
        retry: raw
            .retry
            .map(|r| retry(r, &format!("{at}.retry")))
            .transpose()?,
    })
}

/// Failing loud beats silently ignoring a redirect or header rewrite.
fn refuse_filters(filters: Option<Vec<IgnoredAny>>, at: &str) -> Result<(), FieldError> {
    match filters.unwrap_or_default()[..] {
        [] => Ok(()),
        _ => Err(invalid(at, "filters[0]", "filters are not supported yet")),
    }
}

fn request_match(raw: RawMatch, at: &str) -> Result<Match, FieldError> {
    let path = raw.path.unwrap_or_default();
    let method = match raw.method {
        Some(m) if METHODS.contains(&m.as_str()) => Method::from_bytes(m.as_bytes()).ok(),
        Some(m) => return Err(invalid(at, "method", format!("unknown method `{m}`"))),
        None => None,
    };
    let header_name = |name: &str| HeaderName::from_bytes(name.as_bytes()).ok();
    let query_name = |name: &str| (!name.is_empty()).then(|| name.to_owned());
    Ok(Match {
        path: path_match(path, &format!("{at}.path"))?,
        method,
        headers: value_matches(
            raw.headers.unwrap_or_default(),
            &format!("{at}.headers"),
            header_name,
        )?,
        query: value_matches(
            raw.query_params.unwrap_or_default(),
            &format!("{at}.queryParams"),
            query_name,
        )?,
    })
}

fn path_match(raw: RawPath, at: &str) -> Result<PathMatch, FieldError> {
    let value = raw.value.unwrap_or_else(|| "/".to_owned());
    if !matches!(raw.kind, PathType::RegularExpression) && !value.starts_with('/') {
        return Err(invalid(at, "value", "must start with `/`"));
    }
    Ok(match raw.kind {
        PathType::Exact => PathMatch::Exact(value),
        PathType::PathPrefix => PathMatch::Prefix(value.trim_end_matches('/').to_owned()),
        PathType::RegularExpression => PathMatch::Regex(full_match(&value, at)?),
    })
}

/// Header or query matches; `name` validates and normalizes a name. Only the
/// first entry for a name counts, as the API says.
fn value_matches<N: PartialEq>(
    raw: Vec<RawValueMatch>,
    at: &str,
    name: impl Fn(&str) -> Option<N>,
) -> Result<Vec<(N, ValueMatch)>, FieldError> {
    let mut out: Vec<(N, ValueMatch)> = Vec::new();
    for (i, m) in raw.into_iter().enumerate() {
        let at = format!("{at}[{i}]");
        let Some(key) = name(&m.name) else {
            return Err(invalid(&at, "name", format!("invalid name `{}`", m.name)));
        };
        if out.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let value = match m.kind {
            ValueType::Exact => ValueMatch::Exact(m.value),
            ValueType::RegularExpression => ValueMatch::Regex(full_match(&m.value, &at)?),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// Compiles `at.value` to match whole strings only.
fn full_match(pattern: &str, at: &str) -> Result<Regex, FieldError> {
    // Compiling it alone first proves its groups balance, so the wrapper
    // below cannot be escaped (e.g. by `a)|(b`).
    Regex::new(pattern)
        .and_then(|_| Regex::new(&format!("^(?:{pattern})$")))
        .map_err(|e| invalid(at, "value", format!("invalid regular expression: {e}")))
}

fn backend(raw: RawBackendRef, ns: &str, at: &str) -> Result<(Backend, u32), FieldError> {
    refuse_filters(raw.filters, at)?;
    let core_group = raw.group.as_deref().is_none_or(str::is_empty);
    if !core_group || raw.kind.as_deref().is_some_and(|k| k != "Service") {
        return Err(invalid(
            at,
            "kind",
            "only core Service backends are supported",
        ));
    }
    if raw.name.is_empty() {
        return Err(invalid(at, "name", "must not be empty"));
    }
    let weight = raw.weight.unwrap_or(1);
    let Some(weight) = u32::try_from(weight).ok().filter(|w| *w <= MAX_WEIGHT) else {
        return Err(invalid(
            at,
            "weight",
            format!("{weight} is not in 0..={MAX_WEIGHT}"),
        ));
    };
    let backend = Backend {
        namespace: raw.namespace.unwrap_or_else(|| ns.to_owned()),
        name: raw.name,
        port: nonzero_port(raw.port, at)?,
    };
    Ok((backend, weight))
}

fn nonzero_port(port: Option<u16>, at: &str) -> Result<Option<u16>, FieldError> {
    match port {
        Some(0) => Err(invalid(at, "port", "must be 1..=65535")),
        port => Ok(port),
    }
}

/// `(request, backendRequest)`; a zero duration means no timeout.
type Timeouts = (Option<Duration>, Option<Duration>);

fn timeouts(raw: Option<RawTimeouts>, at: &str) -> Result<Timeouts, FieldError> {
    let raw = raw.unwrap_or_default();
    let parse = |value: Option<String>, field: &str| match value {
        Some(v) => duration(&v, &format!("{at}.{field}")).map(|d| Some(d).filter(|d| !d.is_zero())),
        None => Ok(None),
    };
    let request = parse(raw.request, "request")?;
    let backend = parse(raw.backend_request, "backendRequest")?;
    if let (Some(request), Some(backend)) = (request, backend) {
        if backend > request {
            let message = "must not be longer than timeouts.request";
            return Err(invalid(at, "backendRequest", message));
        }
    }
    Ok((request, backend))
}

fn retry(raw: RawRetry, at: &str) -> Result<Retry, FieldError> {
    let attempts = match raw.attempts {
        None => DEFAULT_RETRY_ATTEMPTS,
        Some(n) => u32::try_from(n)
            .map_err(|_| invalid(at, "attempts", format!("{n} is negative or too large")))?,
    };
    let mut codes = Vec::new();
    for (i, code) in raw.codes.unwrap_or_default().into_iter().enumerate() {
        let Some(code) = u16::try_from(code).ok().filter(|c| (400..=599).contains(c)) else {
            return Err(invalid(
                at,
                &format!("codes[{i}]"),
                format!("{code} is not in 400..=599"),
            ));
        };
        codes.push(code);
    }
    let backoff = match raw.backoff {
        Some(b) => duration(&b, &format!("{at}.backoff"))?,
        None => DEFAULT_BACKOFF,
    };
    Ok(Retry {
        attempts,
        codes,
        backoff,
    })
}

/// A Gateway API (GEP-2257) duration: 1 to 4 parts of 1 to 5 digits and a
/// unit `h`, `m`, `s` or `ms`, e.g. `1m30s`, summed.
pub(super) fn duration(text: &str, at: &str) -> Result<Duration, FieldError> {
    let bad = || {
        FieldError::new(
            at,
            format!("`{text}` is not a duration like 1m30s or 500ms"),
        )
    };
    let (mut rest, mut millis, mut parts) = (text, 0u64, 0);
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        parts += 1;
        if digits == 0 || digits > 5 || parts > 4 {
            return Err(bad());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        // `ms` before `m`, which is its prefix.
        let units = [("ms", 1), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)];
        let (unit, ms) = units
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        millis += value * ms; // at most 4 × 99999h: no overflow
    }
    match parts {
        0 => Err(bad()),
        _ => Ok(Duration::from_millis(millis)),
    }
}
