//! Istio `AuthorizationPolicy` (security.istio.io/v1): parsing into compiled
//! rules, and deciding requests the way Istio does.
//!
//! What differs from a full Istio (refused at parse time rather than ignored,
//! because ignoring part of a DENY or ALLOW policy would silently change who
//! gets in):
//! - `action: CUSTOM` (external authorization);
//! - JWT (`requestPrincipals`, `request.auth.*` conditions);
//! - path templates (`{*}`, `{**}`), `connection.sni`, `experimental.*`.
//!
//! Plain TCP through the waypoint is decided on the same policies, as Istio
//! does: rules that need HTTP attributes (methods, paths, hosts, headers)
//! never match in an ALLOW policy, and match on their other parts in a
//! DENY policy (see [`Policies::evaluate_tcp`]).
//!
//! `remoteIpBlocks` compare against the connection's source address, exactly
//! like `ipBlocks`: the waypoint has no trusted `X-Forwarded-For` hop count,
//! and trusting a client-supplied header would let clients pick their IP.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::request::RequestInfo;
use crate::resource::FieldError;

pub const KIND: &str = "AuthorizationPolicy";

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const JWT_UNSUPPORTED: &str = "request authentication (JWT) is not supported yet";
/// The `Decision::Deny` reason when ALLOW policies apply but none matched.
const NO_ALLOW_MATCHED: &str = "no ALLOW policy matched";

// ---------------------------------------------------------------------------
// The YAML shape. Every level refuses unknown fields: a misspelt `notPaths`
// must be an error, not a silently wider policy, and a misspelt `spec` or
// `namespace` must not drop the policy or move it to another namespace.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: Option<String>,
    /// Already checked by whoever picked this parser.
    #[serde(rename = "kind")]
    _kind: Option<IgnoredAny>,
    metadata: Option<Metadata>,
    /// Optional here only so that its absence is reported as `spec`.
    spec: Option<Spec>,
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
}

use crate::resource::ObjectMeta as Metadata;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    // Only their presence matters: such policies are left to ztunnel.
    selector: Option<IgnoredAny>,
    provider: Option<IgnoredAny>,
    target_ref: Option<TargetRefYaml>,
    target_refs: Option<Vec<TargetRefYaml>>,
    action: Option<ActionYaml>,
    rules: Option<Vec<RuleYaml>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
enum ActionYaml {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetRefYaml {
    group: Option<String>,
    kind: String,
    name: String,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleYaml {
    from: Option<Vec<FromYaml>>,
    to: Option<Vec<ToYaml>>,
    when: Option<Vec<ConditionYaml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromYaml {
    source: Option<SourceYaml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToYaml {
    operation: Option<OperationYaml>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct SourceYaml {
    principals: Vec<String>,
    not_principals: Vec<String>,
    request_principals: Vec<String>,
    not_request_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<String>,
    not_ip_blocks: Vec<String>,
    remote_ip_blocks: Vec<String>,
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct OperationYaml {
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    ports: Vec<String>,
    not_ports: Vec<String>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionYaml {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

// ---------------------------------------------------------------------------
// Compiled form.

/// A parsed, validated policy.
#[derive(Debug, Clone)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    action: Action,
    scope: Scope,
    /// Empty when the policy has no rules: it then matches nothing.
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Debug, Clone)]
enum Scope {
    /// `selector`: a workload policy, enforced by ztunnel.
    Selector,
    /// Neither selector nor targetRefs: namespace (or mesh) wide, L4.
    Namespace,
    Targets(Vec<Target>),
}

/// Targets are always in the policy's namespace (Istio refuses others).
#[derive(Debug, Clone)]
enum Target {
    Gateway(String),
    Service(String),
}

/// `from` and `to` are "any entry matches" lists of "all checks match"
/// groups; an empty list means the rule does not constrain that side.
#[derive(Debug, Clone)]
struct Rule {
    from: Vec<Vec<Check>>,
    to: Vec<Vec<Check>>,
    when: Vec<Check>,
}

/// One field (`principals`, `notPaths`, a `when` values list...): it holds
/// when any value matches, or for a `not` field when none does.
#[derive(Debug, Clone)]
struct Check {
    attr: Attr,
    negated: bool,
}

/// What a check compares, with the values it accepts.
#[derive(Debug, Clone)]
enum Attr {
    /// Known for all traffic, TCP or HTTP.
    Conn(ConnAttr),
    /// Known only for HTTP requests: undecidable on plain TCP.
    Http(HttpAttr),
}

#[derive(Debug, Clone)]
enum ConnAttr {
    Principal(Vec<Pattern>),
    Namespace(Vec<Pattern>),
    SourceIp(Vec<IpNet>),
    DestinationIp(Vec<IpNet>),
    DestinationPort(Vec<u16>),
}

#[derive(Debug, Clone)]
enum HttpAttr {
    Host(Vec<Pattern>),
    Method(Vec<Pattern>),
    Path(Vec<Pattern>),
    Header(HeaderName, Vec<Pattern>),
}

/// What a field or `when` key compares (and so how its values parse).
#[derive(Clone)]
enum Key {
    Principal,
    Namespace,
    SourceIp,
    DestinationIp,
    DestinationPort,
    Host,
    Method,
    Path,
    Header(HeaderName),
}

/// Istio's string match: `*` = any non-empty value, `abc*` prefix,
/// `*abc` suffix, anything else exact.
#[derive(Debug, Clone)]
enum Pattern {
    Present,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

// ---------------------------------------------------------------------------
// Parsing.

/// Parses one document already known to be kind AuthorizationPolicy.
pub fn parse(doc: serde_yaml::Value) -> Result<AuthorizationPolicy, FieldError> {
    let doc: Document = serde_path_to_error::deserialize(doc)
        .map_err(|e| FieldError::new(e.path().to_string(), e.inner().to_string()))?;
    if let Some(v) = doc.api_version.as_deref() {
        if v != "security.istio.io/v1" && v != "security.istio.io/v1beta1" {
            let msg = format!("`{v}` is not security.istio.io/v1");
            return Err(FieldError::new("apiVersion", msg));
        }
    }
    let meta = doc.metadata.ok_or_else(|| required("metadata"))?;
    let name = meta.name.filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| required("metadata.name"))?;
    let namespace = meta.namespace.filter(|n| !n.is_empty());
    let namespace = namespace.unwrap_or_else(|| "default".into());
    let spec = doc.spec.ok_or_else(|| required("spec"))?;

    let action = match spec.action.unwrap_or(ActionYaml::Allow) {
        ActionYaml::Allow => Action::Allow,
        ActionYaml::Deny => Action::Deny,
        ActionYaml::Audit => Action::Audit,
        ActionYaml::Custom => {
            let msg = "action CUSTOM (external authorization) is not supported yet";
            return Err(FieldError::new("spec.action", msg));
        }
    };
    if spec.provider.is_some() {
        let msg = "is only valid with action CUSTOM";
        return Err(FieldError::new("spec.provider", msg));
    }
    let scope = compile_scope(&spec, &namespace)?;
    let rules = spec.rules.unwrap_or_default().into_iter().enumerate();
    let rules = rules.map(|(i, r)| compile_rule(r, &format!("spec.rules[{i}]")));
    let rules = rules.collect::<Result<_, _>>()?;
    Ok(AuthorizationPolicy {
        name,
        namespace,
        action,
        scope,
        rules,
    })
}

fn required(field: impl Into<String>) -> FieldError {
    FieldError::new(field, "is required")
}

fn compile_scope(spec: &Spec, namespace: &str) -> Result<Scope, FieldError> {
    if spec.target_ref.is_some() && spec.target_refs.is_some() {
        let msg = "set targetRef or targetRefs, not both";
        return Err(FieldError::new("spec.targetRef", msg));
    }
    let one = spec
        .target_ref
        .iter()
        .map(|r| ("spec.targetRef".to_string(), r));
    let many = spec.target_refs.iter().flatten().enumerate();
    let many = many.map(|(i, r)| (format!("spec.targetRefs[{i}]"), r));
    let refs: Vec<_> = one.chain(many).collect();
    match (spec.selector.is_some(), refs.is_empty()) {
        (true, true) => Ok(Scope::Selector),
        (false, true) => Ok(Scope::Namespace),
        (true, false) => {
            let msg = "selector and targetRefs are exclusive";
            Err(FieldError::new("spec.selector", msg))
        }
        (false, false) => {
            let targets = refs.iter().map(|(at, r)| compile_target(r, at, namespace));
            Ok(Scope::Targets(targets.collect::<Result<_, _>>()?))
        }
    }
}

fn compile_target(r: &TargetRefYaml, at: &str, namespace: &str) -> Result<Target, FieldError> {
    if r.namespace.as_deref().is_some_and(|ns| ns != namespace) {
        let msg = "cross-namespace references are not supported (must be the policy's namespace)";
        return Err(FieldError::new(format!("{at}.namespace"), msg));
    }
    if r.name.is_empty() {
        return Err(required(format!("{at}.name")));
    }
    match (r.group.as_deref().unwrap_or(""), r.kind.as_str()) {
        (GATEWAY_GROUP, "Gateway") => Ok(Target::Gateway(r.name.clone())),
        ("", "Service") => Ok(Target::Service(r.name.clone())),
        (group, kind @ ("Gateway" | "Service")) => Err(FieldError::new(
            format!("{at}.group"),
            format!("group `{group}` is wrong for kind {kind}"),
        )),
        (_, kind) => Err(FieldError::new(
            format!("{at}.kind"),
            format!("targets of kind `{kind}` are not supported (only Gateway and Service)"),
        )),
    }
}

fn compile_rule(r: RuleYaml, at: &str) -> Result<Rule, FieldError> {
    let from = compile_list(r.from, &format!("{at}.from"), |f, at| {
        let at = format!("{at}.source");
        compile_source(f.source.ok_or_else(|| required(&at))?, &at)
    })?;
    let to = compile_list(r.to, &format!("{at}.to"), |t, at| {
        let at = format!("{at}.operation");
        compile_operation(t.operation.ok_or_else(|| required(&at))?, &at)
    })?;
    let mut when = Vec::new();
    for (i, c) in r.when.unwrap_or_default().into_iter().enumerate() {
        when.extend(compile_condition(c, &format!("{at}.when[{i}]"))?);
    }
    Ok(Rule { from, to, when })
}

/// `from`/`to`: absent means "any"; an explicitly empty list is refused, as
/// Istio does, since it reads as "nothing" but would have meant "anything".
fn compile_list<T>(
    list: Option<Vec<T>>,
    at: &str,
    one: impl Fn(T, &str) -> Result<Vec<Check>, FieldError>,
) -> Result<Vec<Vec<Check>>, FieldError> {
    match list {
        None => Ok(Vec::new()),
        Some(l) if l.is_empty() => Err(FieldError::new(at, "must not be empty (omit it instead)")),
        Some(l) => l
            .into_iter()
            .enumerate()
            .map(|(i, x)| one(x, &format!("{at}[{i}]")))
            .collect(),
    }
}

fn compile_source(s: SourceYaml, at: &str) -> Result<Vec<Check>, FieldError> {
    let jwt = [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ];
    if let Some((field, _)) = jwt.iter().find(|(_, v)| !v.is_empty()) {
        return Err(FieldError::new(format!("{at}.{field}"), JWT_UNSUPPORTED));
    }
    let checks = compile_fields(
        at,
        [
            ("principals", s.principals, Key::Principal),
            ("notPrincipals", s.not_principals, Key::Principal),
            ("namespaces", s.namespaces, Key::Namespace),
            ("notNamespaces", s.not_namespaces, Key::Namespace),
            ("ipBlocks", s.ip_blocks, Key::SourceIp),
            ("notIpBlocks", s.not_ip_blocks, Key::SourceIp),
            ("remoteIpBlocks", s.remote_ip_blocks, Key::SourceIp),
            ("notRemoteIpBlocks", s.not_remote_ip_blocks, Key::SourceIp),
        ],
    )?;
    non_empty(checks, at)
}

fn compile_operation(o: OperationYaml, at: &str) -> Result<Vec<Check>, FieldError> {
    let checks = compile_fields(
        at,
        [
            ("hosts", o.hosts, Key::Host),
            ("notHosts", o.not_hosts, Key::Host),
            ("ports", o.ports, Key::DestinationPort),
            ("notPorts", o.not_ports, Key::DestinationPort),
            ("methods", o.methods, Key::Method),
            ("notMethods", o.not_methods, Key::Method),
            ("paths", o.paths, Key::Path),
            ("notPaths", o.not_paths, Key::Path),
        ],
    )?;
    non_empty(checks, at)
}

/// An empty `source` or `operation` would match everything: refused.
fn non_empty(checks: Vec<Check>, at: &str) -> Result<Vec<Check>, FieldError> {
    if checks.is_empty() {
        return Err(FieldError::new(at, "must not be empty"));
    }
    Ok(checks)
}

fn compile_condition(c: ConditionYaml, at: &str) -> Result<Vec<Check>, FieldError> {
    let key = condition_key(&c.key).map_err(|m| FieldError::new(format!("{at}.key"), m))?;
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(FieldError::new(at, "needs values or notValues"));
    }
    let fields = [
        ("values", c.values, key.clone()),
        ("notValues", c.not_values, key),
    ];
    compile_fields(at, fields)
}

fn condition_key(key: &str) -> Result<Key, String> {
    let header = key.strip_prefix("request.headers[");
    if let Some(name) = header.and_then(|k| k.strip_suffix(']')) {
        let name = HeaderName::from_bytes(name.as_bytes());
        return name.map(Key::Header).map_err(|e| e.to_string());
    }
    match key {
        "source.principal" => Ok(Key::Principal),
        "source.namespace" => Ok(Key::Namespace),
        "source.ip" | "remote.ip" => Ok(Key::SourceIp),
        "destination.ip" => Ok(Key::DestinationIp),
        "destination.port" => Ok(Key::DestinationPort),
        k if k.starts_with("request.auth.") => Err(JWT_UNSUPPORTED.into()),
        k => Err(format!("condition key `{k}` is not supported")),
    }
}

/// Compiles the fields of one `source`, `operation` or condition, given as
/// `(name, values, key)`; a name starting with `not` negates. A refused
/// value is named by its element (`...paths[1]`).
fn compile_fields<'f>(
    at: &str,
    fields: impl IntoIterator<Item = (&'f str, Vec<String>, Key)>,
) -> Result<Vec<Check>, FieldError> {
    let mut checks = Vec::new();
    for (field, values, key) in fields {
        if values.is_empty() {
            continue;
        }
        let attr = compile_values(key, &values);
        let attr = attr.map_err(|(i, m)| FieldError::new(format!("{at}.{field}[{i}]"), m))?;
        let negated = field.starts_with("not");
        checks.push(Check { attr, negated });
    }
    Ok(checks)
}

fn compile_values(key: Key, values: &[String]) -> Result<Attr, (usize, String)> {
    use {Attr::Conn, Attr::Http};
    Ok(match key {
        Key::Principal => Conn(ConnAttr::Principal(each(values, pattern)?)),
        Key::Namespace => Conn(ConnAttr::Namespace(each(values, pattern)?)),
        Key::SourceIp => Conn(ConnAttr::SourceIp(each(values, ip_net)?)),
        Key::DestinationIp => Conn(ConnAttr::DestinationIp(each(values, ip_net)?)),
        Key::DestinationPort => Conn(ConnAttr::DestinationPort(each(values, port)?)),
        Key::Host => Http(HttpAttr::Host(each(values, pattern)?)),
        Key::Method => Http(HttpAttr::Method(each(values, pattern)?)),
        Key::Path => Http(HttpAttr::Path(each(values, path_pattern)?)),
        Key::Header(name) => Http(HttpAttr::Header(name, each(values, pattern)?)),
    })
}

/// Parses every value, refusing empty ones (Istio does too).
fn each<T>(
    values: &[String],
    parse: fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, (usize, String)> {
    let one = |v: &str| {
        if v.is_empty() {
            Err("empty value".into())
        } else {
            parse(v)
        }
    };
    let parsed = values.iter().enumerate();
    parsed.map(|(i, v)| one(v).map_err(|m| (i, m))).collect()
}

fn pattern(s: &str) -> Result<Pattern, String> {
    Ok(if s == "*" {
        Pattern::Present
    } else if let Some(rest) = s.strip_prefix('*') {
        Pattern::Suffix(rest.into())
    } else if let Some(rest) = s.strip_suffix('*') {
        Pattern::Prefix(rest.into())
    } else {
        Pattern::Exact(s.into())
    })
}

/// Literal matching of a template would never match: refuse it instead.
fn path_pattern(s: &str) -> Result<Pattern, String> {
    if s.contains("{*}") || s.contains("{**}") {
        return Err("path templates ({*}, {**}) are not supported yet".into());
    }
    pattern(s)
}

fn port(s: &str) -> Result<u16, String> {
    let digits = s.bytes().all(|b| b.is_ascii_digit());
    let p = s.parse::<u16>().ok().filter(|&p| p != 0 && digits);
    p.ok_or_else(|| format!("`{s}` is not a port number (1-65535)"))
}

fn ip_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not an IP address or CIDR"))
}

// ---------------------------------------------------------------------------
// Matching.

/// What the waypoint knows of a plain TCP connection it decides on (a
/// request's connection facts, without the HTTP ones).
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo<'a> {
    /// As in [`RequestInfo::source_principal`]: the SPIFFE id without
    /// `spiffe://`, `None` when the client proved no identity.
    pub source_principal: Option<&'a str>,
    /// The namespace of that identity.
    pub source_namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    /// The address the client dialled (a service VIP or a pod IP) and port.
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

impl<'a> From<&RequestInfo<'a>> for ConnInfo<'a> {
    fn from(r: &RequestInfo<'a>) -> Self {
        ConnInfo {
            source_principal: r.source_principal,
            source_namespace: r.source_namespace,
            source_ip: r.source_ip,
            destination_ip: r.destination_ip,
            destination_port: r.destination_port,
        }
    }
}

/// The traffic being decided: always a connection; a request too for HTTP.
#[derive(Clone, Copy)]
struct Traffic<'a> {
    conn: ConnInfo<'a>,
    /// `None` for plain TCP: HTTP attributes are then unknown.
    request: Option<&'a RequestInfo<'a>>,
}

impl Rule {
    fn matches(&self, traffic: &Traffic<'_>, action: Action) -> bool {
        // Istio's rule for TCP (Envoy's and ztunnel's): an ALLOW rule that
        // needs HTTP attributes is skipped whole (it must not let in more
        // than written), while a DENY rule drops its HTTP parts and matches
        // on the rest, so that speaking TCP cannot dodge a DENY. AUDIT only
        // logs; it is treated like ALLOW.
        let tcp = traffic.request.is_none();
        if tcp && action != Action::Deny && self.reads_http() {
            return false;
        }
        // From here, an undecidable check can only be a DENY's on TCP.
        let check = |c: &Check| c.matches(traffic).unwrap_or(true);
        let group = |g: &Vec<Check>| g.iter().all(check);
        (self.from.is_empty() || self.from.iter().any(group))
            && (self.to.is_empty() || self.to.iter().any(group))
            && self.when.iter().all(check)
    }

    fn reads_http(&self) -> bool {
        let groups = self.from.iter().chain(&self.to).flatten();
        let mut checks = groups.chain(&self.when);
        checks.any(|c| matches!(c.attr, Attr::Http(_)))
    }
}

impl Check {
    /// A missing attribute value (no identity, no such header) never
    /// "hits", so a positive field fails and a `not` field passes, as in
    /// Istio. `None`: undecidable, an HTTP attribute of TCP traffic.
    fn matches(&self, traffic: &Traffic<'_>) -> Option<bool> {
        let hit = match &self.attr {
            Attr::Conn(a) => a.hit(&traffic.conn),
            Attr::Http(a) => a.hit(traffic.request?),
        };
        Some(hit != self.negated)
    }
}

impl ConnAttr {
    fn hit(&self, conn: &ConnInfo<'_>) -> bool {
        match self {
            ConnAttr::Principal(p) => conn.source_principal.is_some_and(|v| any_of(p, v)),
            // The namespace is that of the identity: none without one.
            ConnAttr::Namespace(p) => {
                let ns = conn.source_principal.and(conn.source_namespace);
                ns.is_some_and(|v| any_of(p, v))
            }
            ConnAttr::SourceIp(nets) => in_nets(nets, conn.source_ip),
            ConnAttr::DestinationIp(nets) => in_nets(nets, conn.destination_ip),
            ConnAttr::DestinationPort(ports) => ports.contains(&conn.destination_port),
        }
    }
}

impl HttpAttr {
    fn hit(&self, req: &RequestInfo<'_>) -> bool {
        match self {
            HttpAttr::Method(p) => any_of(p, req.method.as_str()),
            HttpAttr::Path(p) => any_of(p, req.path),
            HttpAttr::Host(p) => {
                let host = |h: &str| p.iter().any(|p| p.matches(h, true));
                host(req.host) || strip_port(req.host).is_some_and(host)
            }
            // For headers `*` means "present", even with an empty value.
            HttpAttr::Header(name, p) => header_value(req.headers, name).is_some_and(|v| {
                let hit = |p: &Pattern| matches!(p, Pattern::Present) || p.matches(&v, false);
                p.iter().any(hit)
            }),
        }
    }
}

/// Case-sensitive: any pattern matches `value`.
fn any_of(patterns: &[Pattern], value: &str) -> bool {
    patterns.iter().any(|p| p.matches(value, false))
}

impl Pattern {
    fn matches(&self, value: &str, ignore_case: bool) -> bool {
        let eq = |a: &[u8], b: &str| {
            a == b.as_bytes() || ignore_case && a.eq_ignore_ascii_case(b.as_bytes())
        };
        let v = value.as_bytes();
        match self {
            Pattern::Present => !v.is_empty(),
            Pattern::Exact(p) => eq(v, p),
            Pattern::Prefix(p) => v.get(..p.len()).is_some_and(|head| eq(head, p)),
            Pattern::Suffix(p) => {
                let tail = v.len().checked_sub(p.len()).and_then(|i| v.get(i..));
                tail.is_some_and(|tail| eq(tail, p))
            }
        }
    }
}

/// An IPv4 client on a dual-stack socket shows up as `::ffff:a.b.c.d`.
fn in_nets(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// `host:port` → `host`, leaving bare IPv6 (`::1`) alone.
fn strip_port(host: &str) -> Option<&str> {
    let (h, port) = host.rsplit_once(':')?;
    let numeric = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (numeric && (!h.contains(':') || h.ends_with(']'))).then_some(h)
}

/// Repeated headers are joined with `,`, as Envoy does before matching.
fn header_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let values: Vec<_> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect();
    Some(values.join(","))
}

// ---------------------------------------------------------------------------
// The policies of one waypoint.

/// The policies that apply to one waypoint.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    deny: Vec<Applied>,
    allow: Vec<Applied>,
    audit: Vec<Applied>,
}

#[derive(Debug, Clone)]
struct Applied {
    /// `namespace/name`, for decisions and logs.
    id: String,
    namespace: String,
    action: Action,
    /// Targets this waypoint's Gateway: applies to all its traffic.
    whole_waypoint: bool,
    /// Services (in `namespace`) it applies to.
    services: Vec<String>,
    rules: Vec<Rule>,
}

impl Applied {
    /// Whether the policy is in force for traffic to any of `services`
    /// (`(namespace, name)`).
    fn applies(&self, services: &[(&str, &str)]) -> bool {
        let listed = |name: &str| self.services.iter().any(|s| s == name);
        let ours = |&(ns, name): &(&str, &str)| ns == self.namespace && listed(name);
        self.whole_waypoint || services.iter().any(ours)
    }

    /// Whether one of its rules matches (whether it applies aside).
    fn matches(&self, traffic: &Traffic<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(traffic, self.action))
    }
}

/// The part of `p` the waypoint `namespace/name` enforces, or why it
/// enforces none of it (`"ns/policy: reason"`).
fn aimed_at(p: AuthorizationPolicy, namespace: &str, name: &str) -> Result<Applied, String> {
    let id = format!("{}/{}", p.namespace, p.name);
    let targets = match p.scope {
        Scope::Selector => return Err(format!("{id}: has a selector (enforced by ztunnel)")),
        Scope::Namespace => {
            let why = "has no targetRefs (namespace- or mesh-wide L4 policy, enforced by ztunnel)";
            return Err(format!("{id}: {why}"));
        }
        Scope::Targets(targets) => targets,
    };
    let ours = p.namespace == namespace;
    let (mut whole_waypoint, mut services, mut gateways) = (false, Vec::new(), Vec::new());
    for t in targets {
        match t {
            Target::Gateway(g) if ours && g == name => whole_waypoint = true,
            Target::Gateway(g) => gateways.push(format!("{}/{g}", p.namespace)),
            Target::Service(s) => services.push(s),
        }
    }
    if !whole_waypoint && services.is_empty() {
        // Scope::Targets is never empty, so neither is `gateways` here.
        let noun = if gateways.len() == 1 {
            "Gateway"
        } else {
            "Gateways"
        };
        let others = gateways.join(", ");
        return Err(format!("{id}: targets {noun} {others}, not this waypoint"));
    }
    Ok(Applied {
        id,
        namespace: p.namespace,
        action: p.action,
        whole_waypoint,
        services,
        rules: p.rules,
    })
}

impl Policies {
    /// Keeps the policies aimed at this waypoint (its Gateway, or any
    /// Service). Returns too, for logging, one line per policy it does not
    /// enforce, saying why (`"ns/name: has a selector (enforced by
    /// ztunnel)"`, `"ns/name: targets Gateway ns/other, not this
    /// waypoint"`...).
    pub fn new(
        mut all: Vec<AuthorizationPolicy>,
        waypoint_namespace: &str,
        waypoint_name: &str,
    ) -> (Policies, Vec<String>) {
        // A stable order, so the DENY named in decisions does not vary.
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut policies = Policies::default();
        let mut ignored = Vec::new();
        for p in all {
            let applied = match aimed_at(p, waypoint_namespace, waypoint_name) {
                Ok(applied) => applied,
                Err(why) => {
                    ignored.push(why);
                    continue;
                }
            };
            let list = match applied.action {
                Action::Allow => &mut policies.allow,
                Action::Deny => &mut policies.deny,
                Action::Audit => &mut policies.audit,
            };
            list.push(applied);
        }
        (policies, ignored)
    }

    /// Decides one HTTP request sent to any of `services` (`(namespace,
    /// name)`): the Service dialled, or for a request to a pod IP every
    /// Service that pod backs, so that a Service's DENY cannot be dodged
    /// by dialling the pod. Any matching DENY denies; then, if ALLOW
    /// policies apply, one must match. AUDIT only reports.
    pub fn evaluate(&self, services: &[(&str, &str)], req: &RequestInfo<'_>) -> Decision {
        let conn = ConnInfo::from(req);
        self.decide(
            services,
            &Traffic {
                conn,
                request: Some(req),
            },
        )
    }

    /// Decides one plain TCP connection, like [`Policies::evaluate`], with
    /// Istio's rules for HTTP attributes, which TCP lacks: an ALLOW rule
    /// that uses them never matches; a DENY rule that uses them matches
    /// when its other (L4) parts do.
    pub fn evaluate_tcp(&self, services: &[(&str, &str)], conn: &ConnInfo<'_>) -> Decision {
        let conn = *conn;
        self.decide(
            services,
            &Traffic {
                conn,
                request: None,
            },
        )
    }

    fn decide(&self, services: &[(&str, &str)], traffic: &Traffic<'_>) -> Decision {
        let applies = |p: &&Applied| p.applies(services);
        let hits = |p: &&Applied| p.applies(services) && p.matches(traffic);
        let audited = self.audit.iter().filter(hits);
        let audited = audited.map(|p| p.id.clone()).collect();
        if let Some(p) = self.deny.iter().find(hits) {
            return Decision::Deny {
                reason: p.id.clone(),
                audited,
            };
        }
        let mut allows = self.allow.iter().filter(applies).peekable();
        if allows.peek().is_none() || allows.any(|p| p.matches(traffic)) {
            return Decision::Allow { audited };
        }
        Decision::Deny {
            reason: NO_ALLOW_MATCHED.into(),
            audited,
        }
    }

    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len() + self.audit.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `audited`: names (`namespace/name`) of AUDIT policies that matched
    /// (the caller logs them).
    Allow { audited: Vec<String> },
    /// `reason`: `namespace/name` of the DENY policy that matched, or
    /// "no ALLOW policy matched" when ALLOW policies applied and none did.
    Deny {
        reason: String,
        audited: Vec<String>,
    },
}

#[cfg(test)]
mod tests;
