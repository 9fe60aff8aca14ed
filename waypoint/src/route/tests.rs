use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::*;
use crate::resource::FieldError;

type Decision = Option<Result<String, StatusCode>>;
const NOT_FOUND: Decision = Some(Err(StatusCode::NOT_FOUND));
const SERVER_ERROR: Decision = Some(Err(StatusCode::INTERNAL_SERVER_ERROR));

/// A route `ns/<name>` attached to Service `ns/svc`, with `rules` (YAML list
/// items indented by two spaces).
fn doc(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: ns, labels: {{a: b}}}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: svc}}]\n  rules:\n{rules}"
    )
}

/// Rules each sending one match (a YAML flow mapping) to one backend.
fn rules(rules: &[(&str, &str)]) -> String {
    let rule =
        |(m, to): &(&str, &str)| format!("  - {{matches: [{m}], backendRefs: [{{name: {to}}}]}}\n");
    rules.iter().map(rule).collect()
}

fn parse_str(yaml: &str) -> Result<HttpRoute, FieldError> {
    parse(serde_yaml::from_str(yaml).expect("test YAML is well-formed"))
}

fn routes(docs: &[String]) -> Routes {
    Routes::new(docs.iter().map(|d| parse_str(d).expect("valid")).collect())
}

struct Req {
    method: Method,
    path: &'static str,
    query: &'static str,
    headers: HeaderMap,
    namespace: Option<&'static str>,
}

fn get(path: &'static str) -> Req {
    let (method, headers) = (Method::GET, HeaderMap::new());
    let namespace = Some("client");
    Req {
        method,
        path,
        query: "",
        headers,
        namespace,
    }
}

impl Req {
    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }
    fn method(self, method: Method) -> Req {
        Req { method, ..self }
    }
    fn query(self, query: &'static str) -> Req {
        Req { query, ..self }
    }
    fn client_ns(self, namespace: Option<&'static str>) -> Req {
        Req { namespace, ..self }
    }
}

/// The decision for `req` to Service `service` on `port`.
fn decide_on(
    r: &Routes,
    service: (&str, &str),
    port: u16,
    req: &Req,
) -> Option<Result<Action, StatusCode>> {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let info = RequestInfo {
        source_principal: None,
        source_namespace: req.namespace,
        source_ip: ip,
        destination_ip: ip,
        destination_port: port,
        method: &req.method,
        path: req.path,
        query: req.query,
        host: "svc.ns",
        headers: &req.headers,
    };
    r.route(service, port, &info)
}

/// The backend name chosen for `req` to `ns/svc:80`, or the error status.
fn decide(r: &Routes, req: &Req) -> Decision {
    Some(decide_on(r, ("ns", "svc"), 80, req)?.map(|a| a.backend.name))
}

fn to(name: &str) -> Decision {
    Some(Ok(name.to_owned()))
}

#[test]
fn path_prefix_is_element_wise_and_exact_is_exact() {
    let prefix = "{path: {type: PathPrefix, value: /foo/}}";
    let r = routes(&[doc(
        "r",
        &rules(&[
            (prefix, "prefix"),
            ("{path: {type: Exact, value: /bar}}", "exact"),
        ]),
    )]);
    for path in ["/foo", "/foo/", "/foo/bar"] {
        assert_eq!(decide(&r, &get(path)), to("prefix"), "{path}");
    }
    for path in ["/foobar", "/bar/", "/barx", "/"] {
        assert_eq!(decide(&r, &get(path)), NOT_FOUND, "{path}");
    }
    assert_eq!(decide(&r, &get("/bar")), to("exact"));
}

#[test]
fn precedence_exact_then_longest_prefix_then_method_headers_query() {
    // Least specific first, so rule order cannot explain the results.
    let r = routes(&[doc(
        "r",
        &rules(&[
            ("{path: {value: /}}", "root"),
            ("{path: {value: /a}}", "a"),
            ("{path: {value: /a/b}}", "ab"),
            ("{path: {type: Exact, value: /a/b}}", "exact"),
            (
                "{path: {value: /a}, headers: [{name: x, value: '1'}]}",
                "a-x",
            ),
            (
                "{path: {value: /a}, headers: [{name: x, value: '1'}, {name: y, value: '2'}]}",
                "a-xy",
            ),
            (
                "{path: {value: /a}, method: GET, headers: [{name: x, value: '1'}]}",
                "a-get-x",
            ),
            (
                "{path: {value: /q}, queryParams: [{name: a, value: '1'}]}",
                "q1",
            ),
            (
                "{queryParams: [{name: a, value: '1'}, {name: b, value: '2'}], path: {value: /q}}",
                "q2",
            ),
        ]),
    )]);
    assert_eq!(decide(&r, &get("/a/b")), to("exact"));
    assert_eq!(decide(&r, &get("/a/b/c")), to("ab"));
    assert_eq!(decide(&r, &get("/a")), to("a"));
    assert_eq!(decide(&r, &get("/z")), to("root"));
    let xy = || get("/a/c").header("x", "1").header("y", "2");
    assert_eq!(
        decide(&r, &xy()),
        to("a-get-x"),
        "method beats header count"
    );
    assert_eq!(
        decide(&r, &xy().method(Method::POST)),
        to("a-xy"),
        "more headers win"
    );
    assert_eq!(
        decide(&r, &get("/q").query("a=1&b=2")),
        to("q2"),
        "more params win"
    );
}

#[test]
fn oldest_route_wins_ties() {
    let m = [("{path: {value: /same}}", "older")];
    let newer = [("{path: {value: /same}}", "newer")];
    let r = routes(&[doc("zz-older", &rules(&m)), doc("aa-newer", &rules(&newer))]);
    assert_eq!(decide(&r, &get("/same")), to("older"));
    assert_eq!((r.len(), r.is_empty()), (2, false));
}

#[test]
fn header_query_and_method_conditions() {
    // The repeated `x-env` entry is ignored: only the first for a name counts.
    let m = "{method: PUT, queryParams: [{name: debug, value: 'on'}], headers: [{name: X-Env, value: canary}, \
             {name: x-env, value: ignored}, {type: RegularExpression, name: v, value: '[0-9]+'}]}";
    let r = routes(&[doc("r", &rules(&[(m, "canary")]))]);
    let ok = || {
        get("/")
            .method(Method::PUT)
            .query("a=b&debug=on&debug=off")
            .header("x-env", "canary")
    };
    assert_eq!(decide(&r, &ok().header("v", "12")), to("canary"));
    assert_eq!(
        decide(&r, &ok().header("v", "12").method(Method::GET)),
        NOT_FOUND
    );
    assert_eq!(
        decide(&r, &ok().header("v", "12").query("debug=off")),
        NOT_FOUND
    );
    assert_eq!(decide(&r, &ok().header("v", "12").query("")), NOT_FOUND);
    assert_eq!(
        decide(&r, &ok().header("v", "12a")),
        NOT_FOUND,
        "regexes are anchored"
    );
    assert_eq!(decide(&r, &ok()), NOT_FOUND, "missing header");
}

#[test]
fn weighted_split_and_zero_weights() {
    let backends = "[{name: a, weight: 80}, {name: b, weight: 20}, {name: never, weight: 0}]";
    let r = routes(&[doc("r", &format!("  - backendRefs: {backends}\n"))]);
    let mut a = 0;
    for _ in 0..1000 {
        match decide(&r, &get("/"))
            .expect("attached")
            .expect("routed")
            .as_str()
        {
            "a" => a += 1,
            "b" => {}
            other => panic!("picked {other}"),
        }
    }
    assert!((720..=880).contains(&a), "a picked {a} of 1000");

    let r = routes(&[doc("r", "  - backendRefs: [{name: a, weight: 0}]\n")]);
    assert_eq!(decide(&r, &get("/")), SERVER_ERROR, "all weights 0");
    let r = routes(&[doc("r", "  - matches: [{path: {value: /}}]\n")]);
    assert_eq!(decide(&r, &get("/")), SERVER_ERROR, "no backends");
}

#[test]
fn action_carries_backend_timeouts_and_retry_defaults() {
    let rule = "  - backendRefs: [{name: b, namespace: other}]\n    \
                timeouts: {request: 10s, backendRequest: 500ms}\n    retry: {codes: [503]}\n";
    let r = routes(&[doc("r", rule)]);
    let action = decide_on(&r, ("ns", "svc"), 80, &get("/").client_ns(None));
    let action = action.expect("attached").expect("routed");
    let backend = Backend {
        namespace: "other".into(),
        name: "b".into(),
        port: None,
    };
    assert_eq!((action.route.as_str(), action.backend), ("ns/r", backend));
    let timeouts = (action.request_timeout, action.backend_timeout);
    assert_eq!(
        timeouts,
        (
            Some(Duration::from_secs(10)),
            Some(Duration::from_millis(500))
        )
    );
    let retry = Retry {
        attempts: 2,
        codes: vec![503],
        backoff: Duration::from_millis(25),
    };
    assert_eq!(action.retry, Some(retry));
}

#[test]
fn unattached_service_or_gateway_parent_is_none_and_no_match_is_404() {
    let r = routes(&[doc(
        "r",
        &rules(&[("{path: {type: Exact, value: /x}}", "x")]),
    )]);
    assert_eq!(decide(&r, &get("/y")), NOT_FOUND);
    assert_eq!(decide_on(&r, ("ns", "other"), 80, &get("/x")), None);
    assert_eq!(decide_on(&r, ("elsewhere", "svc"), 80, &get("/x")), None);

    let gateway = doc("g", "  - backendRefs: [{name: b}]\n")
        .replace("group: \"\", kind: Service", "kind: Gateway");
    assert_eq!(decide(&routes(&[gateway]), &get("/")), None);
}

#[test]
fn port_scoped_parent_attaches_only_to_that_port() {
    let d =
        doc("r", "  - backendRefs: [{name: b}]\n").replace("name: svc}", "name: svc, port: 9090}");
    let r = routes(&[d]);
    assert_eq!(decide(&r, &get("/")), None, "dialled port 80");
    let action = decide_on(&r, ("ns", "svc"), 9090, &get("/")).expect("attached");
    assert_eq!(action.map(|a| a.backend.name), Ok("b".to_owned()));
}

#[test]
fn consumer_route_governs_only_its_own_namespace() {
    let producer = doc("p", "  - backendRefs: [{name: producer}]\n");
    let consumer = doc("c", "  - backendRefs: [{name: consumer}]\n")
        .replace("namespace: ns,", "namespace: client,")
        .replace("name: svc}", "name: svc, namespace: ns}");
    // The consumer route is the older one, so only scoping keeps it from others.
    let r = routes(&[consumer, producer]);
    assert_eq!(decide(&r, &get("/")), to("consumer"));
    assert_eq!(
        decide(&r, &get("/").client_ns(Some("third"))),
        to("producer")
    );
    assert_eq!(decide(&r, &get("/").client_ns(None)), to("producer"));
}

#[test]
fn durations_parse_and_refuse() {
    let ok = |s| parse::duration(s, "f").expect("valid duration");
    assert_eq!(ok("1m30s"), Duration::from_secs(90));
    assert_eq!(ok("500ms"), Duration::from_millis(500));
    assert_eq!(ok("0s"), Duration::ZERO);
    assert_eq!(ok("1h1m1s1ms"), Duration::from_millis(3_661_001));
    let bad = [
        "",
        "10",
        "1.5s",
        "-1s",
        "1d",
        "100000s",
        "1h1m1s1ms1h",
        "5 s",
        "s",
        "1µs",
        "1sm",
    ];
    for bad in bad {
        assert!(parse::duration(bad, "f").is_err(), "{bad:?} accepted");
    }
    // Zero means no timeout; a malformed one names its field.
    let r = routes(&[doc(
        "r",
        "  - backendRefs: [{name: b}]\n    timeouts: {request: 0s}\n",
    )]);
    assert_eq!(r.routes[0].rules[0].request_timeout, None);
    let e = parse_str(&doc("r", "  - timeouts: {backendRequest: 1x}\n")).unwrap_err();
    assert_eq!(e.field, "spec.rules[0].timeouts.backendRequest");
    let e = parse_str(&doc(
        "r",
        "  - timeouts: {request: 1s, backendRequest: 2s}\n",
    ))
    .unwrap_err();
    assert_eq!(e.field, "spec.rules[0].timeouts.backendRequest");
}

#[test]
fn unsupported_misspelled_and_bad_values_refused_with_their_field() {
    // Each line: the field named in the error | one rule.
    let cases = "\
        rules[0].filters[0]                 | filters: [{type: RequestRedirect}]
        rules[0].backendRefs[0].filters[0]  | backendRefs: [{name: b, filters: [{type: X}]}]
        rules[0].sessionPersistence         | sessionPersistence: {type: Cookie}
        rules[0].backendRefs[1].wieght      | backendRefs: [{name: a}, {name: b, wieght: 3}]
        rules[0].matchs                     | matchs: []
        rules[0].matches[0].path.type       | matches: [{path: {type: Prefix}}]
        rules[0].backendRefs[0].port        | backendRefs: [{name: b, port: 70000}]
        rules[0].backendRefs[1].weight      | backendRefs: [{name: a}, {name: b, weight: 1000001}]
        rules[0].backendRefs[0].weight      | backendRefs: [{name: b, weight: -1}]
        rules[0].backendRefs[0].kind        | backendRefs: [{name: b, kind: ServiceImport}]
        rules[0].retry.codes[1]             | retry: {codes: [500, 302]}
        rules[0].retry.attempts             | retry: {attempts: -1}
        rules[0].matches[0].path.value      | matches: [{path: {type: RegularExpression, value: 'a)|(b'}}]
        rules[0].matches[0].path.value      | matches: [{path: {type: Exact, value: foo}}]
        rules[0].matches[0].method          | matches: [{method: FETCH}]
        rules[0].matches[0].headers[0].name | matches: [{headers: [{name: 'bad name', value: x}]}]";
    for line in cases.lines() {
        let (field, rule) = line.split_once('|').expect("table row");
        let e = parse_str(&doc("r", &format!("  - {}\n", rule.trim()))).expect_err(line);
        assert_eq!(e.field, format!("spec.{}", field.trim()), "{line}: {e}");
    }
    let e = parse_str(&doc("r", "  - filters: [{type: RequestRedirect}]\n")).unwrap_err();
    assert_eq!(e.message, "filters are not supported yet");
    // Metadata extras and status are not ours to judge.
    let with_status = doc("r", "  - backendRefs: [{name: b}]\n") + "status: {parents: []}\n";
    assert!(parse_str(&with_status).is_ok());
}

#[test]
fn defaults_namespace_rules_and_matches() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
                spec: {parentRefs: [{kind: Service, name: svc}], hostnames: [a.example]}\n";
    let route = parse_str(yaml).expect("valid");
    assert_eq!(
        (
            route.namespace.as_str(),
            route.parents[0].namespace.as_str()
        ),
        ("default", "default")
    );
    // The API's default rule matches everything and has no backends.
    let decision = decide_on(
        &Routes::new(vec![route]),
        ("default", "svc"),
        80,
        &get("/x"),
    );
    assert_eq!(decision, Some(Err(StatusCode::INTERNAL_SERVER_ERROR)));
    let e = parse_str(&yaml.replace("kind: HTTPRoute", "kind: GRPCRoute")).unwrap_err();
    assert_eq!(e.field, "kind");
}

#[test]
fn misspelt_or_missing_top_level_fields_are_refused() {
    let head = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n";
    let field = |rest: &str| parse_str(&format!("{head}{rest}")).expect_err(rest).field;
    // Each would otherwise drop the route, or move it to `default`.
    assert_eq!(field("metadata: {name: r}\nSpec: {}"), "Spec");
    assert_eq!(field("metadata: {name: r}"), ".");
    assert_eq!(
        field("metadata: {name: r, nmespace: ns}\nspec: {}"),
        "metadata.nmespace"
    );
    // What Kubernetes itself writes in metadata is accepted.
    let metadata = "metadata: {name: r, namespace: ns, labels: {a: b}, annotations: {c: d}, \
                    uid: 0a1b, resourceVersion: '7', generation: 2, \
                    creationTimestamp: '2024-01-01T00:00:00Z', managedFields: [{manager: kubectl}], \
                    ownerReferences: [], finalizers: [x], generateName: r-}\n";
    let route = parse_str(&format!("{head}{metadata}spec: {{}}")).expect("valid");
    assert_eq!((route.namespace.as_str(), route.name.as_str()), ("ns", "r"));
}
