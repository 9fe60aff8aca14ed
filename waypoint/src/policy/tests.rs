use super::*;
use http::{HeaderValue, Method};

/// Owns what a `RequestInfo` borrows.
struct Req {
    principal: Option<&'static str>,
    namespace: Option<&'static str>,
    source_ip: IpAddr,
    method: Method,
    host: &'static str,
    headers: HeaderMap,
}

fn req() -> Req {
    Req {
        principal: Some("cluster.local/ns/client/sa/app"),
        namespace: Some("client"),
        source_ip: [10, 1, 2, 3].into(),
        method: Method::GET,
        host: "svc.ns1.svc.cluster.local",
        headers: HeaderMap::new(),
    }
}

/// A request from a client that proved no identity.
fn anonymous() -> Req {
    let (principal, namespace) = (None, None);
    Req {
        principal,
        namespace,
        ..req()
    }
}

impl Req {
    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            source_principal: self.principal,
            source_namespace: self.namespace,
            source_ip: self.source_ip,
            destination_ip: [10, 96, 0, 1].into(),
            destination_port: 8080,
            method: &self.method,
            path: "/api/items",
            query: "",
            host: self.host,
            headers: &self.headers,
        }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }
}

fn try_parse(yaml: &str) -> Result<AuthorizationPolicy, FieldError> {
    parse(serde_yaml::from_str(yaml).expect("test YAML"))
}

/// A policy `ns1/<name>` targeting the waypoint `ns1/wp`; `spec` is the rest
/// of its spec in YAML flow style (`action: DENY, rules: [...]`).
fn policy(name: &str, spec: &str) -> AuthorizationPolicy {
    let gateway = "{group: gateway.networking.k8s.io, kind: Gateway, name: wp}";
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: ns1}}\nspec: {{targetRefs: [{gateway}], {spec}}}"
    );
    try_parse(&yaml).expect("valid policy")
}

/// The field named when this spec (flow style) is refused.
fn refused(spec: &str) -> String {
    let yaml = format!("metadata: {{name: p}}\nspec: {{{spec}}}");
    try_parse(&yaml).expect_err("must be refused").field
}

/// Shorthand for a rule: `source: ...`, `operation: ...` or `key: ...`
/// become a rule with that one `from`, `to` or `when` entry.
fn rule(s: &str) -> String {
    let side = match s.split(':').next() {
        Some("source") => "from",
        Some("operation") => "to",
        Some("key") => "when",
        _ => return s.to_string(),
    };
    format!("{{{side}: [{{{s}}}]}}")
}

/// The field named when a policy with this one rule is refused.
fn rule_refused(r: &str) -> String {
    refused(&format!("rules: [{}]", rule(r)))
}

fn decide(all: Vec<AuthorizationPolicy>, r: &Req) -> Decision {
    let (policies, _) = Policies::new(all, "ns1", "wp");
    policies.evaluate(&[("ns1", "svc")], &r.info())
}

/// As `decide`, for a plain TCP connection with the request's L4 facts.
fn decide_tcp(all: Vec<AuthorizationPolicy>, r: &Req) -> Decision {
    let (policies, _) = Policies::new(all, "ns1", "wp");
    policies.evaluate_tcp(&[("ns1", "svc")], &ConnInfo::from(&r.info()))
}

/// Checks whether an ALLOW policy with just this rule admits the request.
fn expect(r: &Req, cases: &[(&str, bool)]) {
    for (case, want) in cases {
        let p = policy("a", &format!("rules: [{}]", rule(case)));
        let allowed = matches!(decide(vec![p], r), Decision::Allow { .. });
        assert_eq!(allowed, *want, "{case}");
    }
}

fn allowed() -> Decision {
    Decision::Allow { audited: vec![] }
}

fn denied(reason: &str) -> Decision {
    let (reason, audited) = (reason.into(), vec![]);
    Decision::Deny { reason, audited }
}

#[test]
fn deny_beats_allow() {
    let allow = policy("all", "rules: [{}]");
    let deny = policy(
        "no-get",
        "action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}]",
    );
    let both = vec![allow.clone(), deny.clone()];
    assert_eq!(decide(both, &req()), denied("ns1/no-get"));
    let post = Req {
        method: Method::POST,
        ..req()
    };
    assert_eq!(decide(vec![allow, deny], &post), allowed());
}

#[test]
fn allow_policies_must_match_and_none_means_allow() {
    assert_eq!(decide(vec![], &req()), allowed());
    let post = policy("p", "rules: [{to: [{operation: {methods: [POST]}}]}]");
    assert_eq!(decide(vec![post.clone()], &req()), denied(NO_ALLOW_MATCHED));
    let get = policy("g", "rules: [{to: [{operation: {methods: [GET]}}]}]");
    assert_eq!(decide(vec![post, get], &req()), allowed());
}

#[test]
fn no_rules_matches_nothing_and_empty_rule_everything() {
    let nothing = |spec| decide(vec![policy("n", spec)], &req());
    assert_eq!(nothing("action: ALLOW"), denied(NO_ALLOW_MATCHED));
    assert_eq!(nothing("rules: []"), denied(NO_ALLOW_MATCHED));
    assert_eq!(nothing("action: DENY"), allowed());
    assert_eq!(nothing("action: DENY, rules: [{}]"), denied("ns1/n"));
    assert_eq!(nothing("action: ALLOW, rules: [{}]"), allowed());
}

#[test]
fn principals_and_namespaces() {
    let cases = [
        (
            "source: {principals: [cluster.local/ns/client/sa/app]}",
            true,
        ),
        ("source: {principals: ['*/sa/app']}", true),
        ("source: {principals: ['cluster.local/*']}", true),
        ("source: {principals: [cluster.local/ns/x/sa/y]}", false),
        ("source: {notPrincipals: ['*']}", false),
        ("source: {notPrincipals: [cluster.local/ns/x/sa/y]}", true),
        ("source: {namespaces: [client, x]}", true),
        ("source: {namespaces: [other]}", false),
        ("source: {notNamespaces: [client]}", false),
    ];
    expect(&req(), &cases);
    // Without identity positive lists fail; `notPrincipals: ["*"]` is how
    // Istio selects unauthenticated requests.
    let cases = [
        ("source: {principals: ['*']}", false),
        ("source: {namespaces: ['*']}", false),
        ("source: {notPrincipals: ['*']}", true),
        ("source: {notNamespaces: [client]}", true),
    ];
    expect(&anonymous(), &cases);
}

#[test]
fn ip_blocks() {
    let cases = [
        ("source: {ipBlocks: [10.0.0.0/8]}", true),
        ("source: {ipBlocks: [10.1.2.3]}", true),
        ("source: {ipBlocks: [192.168.0.0/16]}", false),
        ("source: {notIpBlocks: [10.1.0.0/16]}", false),
        ("source: {remoteIpBlocks: [10.1.2.0/24]}", true),
        ("source: {notRemoteIpBlocks: [10.1.2.0/24]}", false),
    ];
    expect(&req(), &cases);
    let mapped = "::ffff:10.1.2.3".parse().expect("IPv6");
    let mapped = Req {
        source_ip: mapped,
        ..req()
    };
    expect(&mapped, &[("source: {ipBlocks: [10.0.0.0/8]}", true)]);
    let bad = rule_refused("source: {ipBlocks: [10.0.0.0/8, 300.1.1.1]}");
    assert_eq!(bad, "spec.rules[0].from[0].source.ipBlocks[1]");
}

#[test]
fn methods_paths_ports() {
    let cases = [
        ("operation: {methods: [PUT, GET]}", true),
        ("operation: {methods: [get]}", false),
        ("operation: {notMethods: [GET]}", false),
        ("operation: {notMethods: [DELETE]}", true),
        ("operation: {paths: [/api/items]}", true),
        ("operation: {paths: [/api]}", false),
        ("operation: {paths: ['/api/*']}", true),
        ("operation: {paths: ['/admin/*']}", false),
        ("operation: {paths: ['*/items']}", true),
        ("operation: {paths: ['*/users']}", false),
        ("operation: {paths: ['*']}", true),
        ("operation: {notPaths: ['/api/*']}", false),
        ("operation: {notPaths: ['/admin/*']}", true),
        ("operation: {ports: ['8080']}", true),
        ("operation: {ports: ['80']}", false),
        ("operation: {notPorts: ['8080']}", false),
    ];
    expect(&req(), &cases);
    let template = rule_refused("operation: {paths: ['/a/{*}/b']}");
    assert_eq!(template, "spec.rules[0].to[0].operation.paths[0]");
    let port = rule_refused("operation: {ports: ['80', http]}");
    assert_eq!(port, "spec.rules[0].to[0].operation.ports[1]");
}

#[test]
fn hosts_ignore_case_and_port() {
    let with_port = Req {
        host: "Svc.ns1.svc.cluster.local:8080",
        ..req()
    };
    for r in [req(), with_port] {
        let cases = [
            ("operation: {hosts: [svc.ns1.svc.cluster.local]}", true),
            ("operation: {hosts: ['*.CLUSTER.local']}", true),
            ("operation: {hosts: [other.example]}", false),
            ("operation: {notHosts: ['svc.*']}", false),
        ];
        expect(&r, &cases);
    }
    let v6 = Req {
        host: "[fd00::1]:80",
        ..req()
    };
    expect(&v6, &[("operation: {hosts: ['[fd00::1]']}", true)]);
}

#[test]
fn header_conditions() {
    // Repeated headers are matched joined with commas.
    let r = req().header("x-team", "blue").header("x-team", "green");
    let cases = [
        (
            "key: 'request.headers[X-Team]', values: ['blue,green']",
            true,
        ),
        ("key: 'request.headers[x-team]', values: ['blue*', x]", true),
        ("key: 'request.headers[x-team]', values: [red]", false),
        ("key: 'request.headers[x-team]', notValues: ['*']", false),
        // A missing header: `values` fails, `notValues` passes.
        ("key: 'request.headers[x-other]', values: ['*']", false),
        ("key: 'request.headers[x-other]', notValues: [a]", true),
    ];
    expect(&r, &cases);
    let empty = req().header("x-flag", "");
    expect(
        &empty,
        &[("key: 'request.headers[x-flag]', values: ['*']", true)],
    );
}

#[test]
fn other_conditions_and_rule_structure() {
    let cases = [
        ("key: source.ip, values: [10.1.0.0/16]", true),
        ("key: remote.ip, notValues: [10.2.0.0/16]", true),
        ("key: destination.ip, values: [10.96.0.1]", true),
        ("key: destination.port, values: ['80']", false),
        ("key: source.namespace, values: [client]", true),
        ("key: source.principal, notValues: ['*/sa/app']", false),
        // Every condition must hold; `from` entries are alternatives; all
        // fields of one source must hold; `from` and `to` must both hold.
        (
            "{when: [{key: source.ip, values: [10.0.0.0/8]}, {key: remote.ip, values: ['::1']}]}",
            false,
        ),
        (
            "{from: [{source: {namespaces: [x]}}, {source: {namespaces: [client]}}]}",
            true,
        ),
        (
            "{from: [{source: {namespaces: [client], ipBlocks: [1.1.1.1]}}]}",
            false,
        ),
        (
            "{from: [{source: {namespaces: [client]}}], to: [{operation: {ports: ['1']}}]}",
            false,
        ),
    ];
    expect(&req(), &cases);
    assert_eq!(
        rule_refused("key: connection.sni, values: [a]"),
        "spec.rules[0].when[0].key"
    );
    assert_eq!(rule_refused("key: source.ip"), "spec.rules[0].when[0]");
    assert_eq!(rule_refused("{from: []}"), "spec.rules[0].from");
    assert_eq!(
        rule_refused("operation: {}"),
        "spec.rules[0].to[0].operation"
    );
}

#[test]
fn service_targeted_policies_apply_to_their_service_only() {
    let yaml = "metadata: {name: svc-only, namespace: ns1}\nspec: {action: DENY, \
                targetRefs: [{kind: Service, group: '', name: svc}], rules: [{}]}";
    let (policies, ignored) = Policies::new(vec![try_parse(yaml).expect("valid")], "ns1", "wp");
    assert!(ignored.is_empty());
    assert_eq!(policies.len(), 1);
    let info = req();
    let decide = |services: &[(&str, &str)]| policies.evaluate(services, &info.info());
    assert_eq!(decide(&[("ns1", "svc")]), denied("ns1/svc-only"));
    assert_eq!(decide(&[("ns1", "other")]), allowed());
    assert_eq!(decide(&[("ns2", "svc")]), allowed());
    assert_eq!(decide(&[]), allowed());
    // An ALLOW policy for another service does not deny this one.
    let other = yaml
        .replace("DENY", "ALLOW")
        .replace("name: svc}", "name: other}");
    let (policies, _) = Policies::new(vec![try_parse(&other).expect("valid")], "ns1", "wp");
    assert_eq!(
        policies.evaluate(&[("ns1", "svc")], &info.info()),
        allowed()
    );
}

#[test]
fn service_deny_applies_when_any_of_several_services_is_its_target() {
    // A request to a pod IP is checked against every Service of that pod:
    // dialling the pod must not dodge a DENY on one of them.
    let yaml = "metadata: {name: svc-only, namespace: ns1}\nspec: {action: DENY, \
                targetRefs: [{kind: Service, name: svc}], rules: [{}]}";
    let (policies, _) = Policies::new(vec![try_parse(yaml).expect("valid")], "ns1", "wp");
    let r = req();
    let both = [("ns1", "other"), ("ns1", "svc")];
    assert_eq!(policies.evaluate(&both, &r.info()), denied("ns1/svc-only"));
    let conn = ConnInfo::from(&r.info());
    assert_eq!(policies.evaluate_tcp(&both, &conn), denied("ns1/svc-only"));
    let neither = [("ns1", "other"), ("ns2", "svc")];
    assert_eq!(policies.evaluate(&neither, &r.info()), allowed());
    assert_eq!(policies.evaluate_tcp(&neither, &conn), allowed());
}

#[test]
fn selector_and_namespace_wide_policies_are_ignored() {
    let gateway = "{group: gateway.networking.k8s.io, kind: Gateway, name: wp}";
    let all = [
        "metadata: {name: s, namespace: ns1}\nspec: {selector: {matchLabels: {app: a}}}".into(),
        "metadata: {name: w, namespace: ns1}\nspec: {}".into(),
        format!("metadata: {{name: t, namespace: ns1}}\nspec: {{targetRef: {gateway}}}"),
        format!("metadata: {{name: o, namespace: ns2}}\nspec: {{targetRef: {gateway}}}"),
    ];
    let all = all.iter().map(|y| try_parse(y).expect("valid")).collect();
    let (policies, ignored) = Policies::new(all, "ns1", "wp");
    assert_eq!(
        ignored,
        [
            "ns1/s: has a selector (enforced by ztunnel)",
            "ns1/w: has no targetRefs (namespace- or mesh-wide L4 policy, enforced by ztunnel)",
            "ns2/o: targets Gateway ns2/wp, not this waypoint",
        ]
    );
    assert_eq!(policies.len(), 1);
    // The singular targetRef is kept; with no rules it denies everything.
    assert_eq!(
        policies.evaluate(&[], &req().info()),
        denied(NO_ALLOW_MATCHED)
    );
}

#[test]
fn policies_for_other_gateways_are_listed_as_ignored() {
    let gateway =
        |name| format!("{{group: gateway.networking.k8s.io, kind: Gateway, name: {name}}}");
    let (other, wp) = (gateway("other"), gateway("wp"));
    let all = [
        format!("metadata: {{name: a, namespace: ns1}}\nspec: {{targetRefs: [{other}]}}"),
        format!("metadata: {{name: b, namespace: ns1}}\nspec: {{targetRefs: [{other}, {wp}]}}"),
        // Another Gateway and a Service: kept for the Service.
        format!(
            "metadata: {{name: c, namespace: ns1}}\n\
             spec: {{targetRefs: [{other}, {{kind: Service, name: svc}}]}}"
        ),
        format!(
            "metadata: {{name: d, namespace: ns1}}\n\
             spec: {{targetRefs: [{other}, {}]}}",
            gateway("third")
        ),
    ];
    let all = all.iter().map(|y| try_parse(y).expect("valid")).collect();
    let (policies, ignored) = Policies::new(all, "ns1", "wp");
    assert_eq!(
        ignored,
        [
            "ns1/a: targets Gateway ns1/other, not this waypoint",
            "ns1/d: targets Gateways ns1/other, ns1/third, not this waypoint",
        ]
    );
    assert_eq!(policies.len(), 2);
}

#[test]
fn audit_is_listed_and_changes_nothing() {
    let audit = |name, method| {
        let spec =
            format!("action: AUDIT, rules: [{{to: [{{operation: {{methods: [{method}]}}}}]}}]");
        policy(name, &spec)
    };
    let (get, post) = (audit("log-get", "GET"), audit("log-post", "POST"));
    let audited = vec!["ns1/log-get".to_string()];
    let expected = Decision::Allow {
        audited: audited.clone(),
    };
    assert_eq!(decide(vec![get.clone(), post], &req()), expected);
    let deny = policy("d", "action: DENY, rules: [{}]");
    let expected = Decision::Deny {
        reason: "ns1/d".into(),
        audited,
    };
    assert_eq!(decide(vec![get, deny], &req()), expected);
}

#[test]
fn unsupported_features_are_refused() {
    let yaml = "metadata: {name: p}\nspec: {action: CUSTOM, provider: {name: ext}}";
    let e = try_parse(yaml).expect_err("CUSTOM");
    assert_eq!(e.field, "spec.action");
    assert!(e
        .message
        .contains("CUSTOM (external authorization) is not supported yet"));
    let jwt = rule_refused("source: {requestPrincipals: ['*']}");
    assert_eq!(jwt, "spec.rules[0].from[0].source.requestPrincipals");
    let yaml = "metadata: {name: p}\nspec: {rules: [{when: [{key: 'request.auth.claims[iss]'}]}]}";
    let e = try_parse(yaml).expect_err("JWT");
    assert_eq!(
        (e.field.as_str(), e.message.as_str()),
        ("spec.rules[0].when[0].key", JWT_UNSUPPORTED)
    );
}

#[test]
fn misspelt_and_invalid_fields_name_their_path() {
    let notpath = rule_refused("operation: {methods: [GET], notPath: [/a]}");
    assert_eq!(notpath, "spec.rules[0].to[0].operation.notPath");
    let method = rule_refused("operation: {methods: [GET, 5]}");
    assert_eq!(method, "spec.rules[0].to[0].operation.methods[1]");
    assert_eq!(refused("action: REJECT"), "spec.action");
    assert_eq!(refused("rule: [{}]"), "spec.rule");
    let kind = refused("targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: x}]");
    assert_eq!(kind, "spec.targetRefs[0].kind");
    let both = refused("selector: {matchLabels: {a: b}}, targetRefs: [{kind: Service, name: x}]");
    assert_eq!(both, "spec.selector");
    let ns = refused("targetRefs: [{kind: Service, name: x, namespace: elsewhere}]");
    assert_eq!(ns, "spec.targetRefs[0].namespace");
    assert_eq!(
        try_parse("metadata: {namespace: a}")
            .expect_err("no name")
            .field,
        "metadata.name"
    );
    // Extra metadata and status are fine; the namespace defaults.
    let p = try_parse("metadata: {name: a, labels: {x: y}}\nstatus: {}\nspec: {}").expect("valid");
    assert_eq!((p.name.as_str(), p.namespace.as_str()), ("a", "default"));
}

#[test]
fn misspelt_or_missing_top_level_fields_are_refused() {
    let doc = |rest: &str| format!("apiVersion: security.istio.io/v1\nkind: {KIND}\n{rest}");
    let field = |rest: &str| try_parse(&doc(rest)).expect_err(rest).field;
    // Each would otherwise drop the policy, or move it to `default`.
    assert_eq!(field("metadata: {name: p}\nSpec: {action: DENY}"), "Spec");
    assert_eq!(field("metadata: {name: p}"), "spec");
    assert_eq!(field("metadata: {name: p}\nspec: null"), "spec");
    let e = try_parse(&doc("metadata: {name: x, nmespace: y}\nspec: {}")).expect_err("nmespace");
    assert_eq!(e.field, "metadata.nmespace");
    assert!(
        e.message.contains("unknown field `nmespace`"),
        "{}",
        e.message
    );
    assert_eq!(field("metdata: {name: p}\nspec: {}"), "metdata");
    // What Kubernetes itself writes in metadata is accepted.
    let metadata = "metadata: {name: p, namespace: ns1, labels: {a: b}, annotations: {c: d}, \
                    uid: 0a1b, resourceVersion: '7', generation: 2, \
                    creationTimestamp: '2024-01-01T00:00:00Z', managedFields: [{manager: kubectl}], \
                    ownerReferences: [], finalizers: [x], generateName: p-}\n";
    let p = try_parse(&doc(&format!("{metadata}spec: {{}}\nstatus: {{}}"))).expect("valid");
    assert_eq!((p.name.as_str(), p.namespace.as_str()), ("p", "ns1"));
}

#[test]
fn tcp_allow_rules_needing_http_never_match() {
    let paths = policy("p", "rules: [{to: [{operation: {paths: ['*']}}]}]");
    assert_eq!(decide(vec![paths.clone()], &req()), allowed());
    assert_eq!(decide_tcp(vec![paths], &req()), denied(NO_ALLOW_MATCHED));
    let cases = [
        (
            "source: {principals: [cluster.local/ns/client/sa/app]}",
            true,
        ),
        ("source: {principals: [cluster.local/ns/x/sa/y]}", false),
        ("operation: {ports: ['8080']}", true),
        ("key: destination.port, values: ['8080']", true),
        ("operation: {notMethods: [CONNECT]}", false),
        ("operation: {hosts: ['*']}", false),
        ("key: 'request.headers[x-a]', notValues: [b]", false),
        // Skipped whole, as Istio does, even though the ports alternative
        // alone would have matched.
        (
            "{to: [{operation: {ports: ['8080']}}, {operation: {paths: [/a]}}]}",
            false,
        ),
        // One rule needing HTTP does not spoil the policy's other rules.
        (
            "{to: [{operation: {paths: [/a]}}]}, {from: [{source: {namespaces: [client]}}]}",
            true,
        ),
    ];
    for (case, want) in cases {
        let p = policy("a", &format!("rules: [{}]", rule(case)));
        let allowed = matches!(decide_tcp(vec![p], &req()), Decision::Allow { .. });
        assert_eq!(allowed, want, "{case}");
    }
    // AUDIT is treated like ALLOW: not listed.
    let audit = policy(
        "l",
        "action: AUDIT, rules: [{to: [{operation: {paths: ['*']}}]}]",
    );
    assert_eq!(decide_tcp(vec![audit], &req()), allowed());
}

#[test]
fn tcp_deny_rules_needing_http_match_on_their_l4_parts() {
    let deny = |from: &str| {
        let spec = format!(
            "action: DENY, rules: [{{from: [{{source: {from}}}], \
             to: [{{operation: {{paths: [/admin]}}}}]}}]"
        );
        policy("d", &spec)
    };
    // Fail closed: the path is unknown, the principal matches.
    let me = deny("{principals: [cluster.local/ns/client/sa/app]}");
    assert_eq!(decide_tcp(vec![me.clone()], &req()), denied("ns1/d"));
    // Over HTTP, the path decides.
    assert_eq!(decide(vec![me], &req()), allowed());
    let other = deny("{principals: [cluster.local/ns/x/sa/y]}");
    assert_eq!(decide_tcp(vec![other], &req()), allowed());
    let unauthenticated = deny("{notPrincipals: ['*']}");
    assert_eq!(decide_tcp(vec![unauthenticated.clone()], &req()), allowed());
    assert_eq!(
        decide_tcp(vec![unauthenticated], &anonymous()),
        denied("ns1/d")
    );
    // Only HTTP parts: denies all TCP; `not` fields are unknown too.
    let cases = [
        "action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]",
        "action: DENY, rules: [{to: [{operation: {notHosts: ['*']}}]}]",
        "action: DENY, rules: [{when: [{key: 'request.headers[x-a]', values: [b]}]}]",
    ];
    for spec in cases {
        assert_eq!(
            decide_tcp(vec![policy("d", spec)], &req()),
            denied("ns1/d"),
            "{spec}"
        );
    }
    let other_port = "action: DENY, rules: [{to: [{operation: {paths: [/a], ports: ['1']}}]}]";
    assert_eq!(decide_tcp(vec![policy("d", other_port)], &req()), allowed());
}
