//! An inbound CONNECT request, read: its authority (the only thing a peer
//! may ask for: the pod the connection was captured for), and the headers
//! the sending ztunnel adds, `forwarded` (RFC 7239) and `baggage` (W3C
//! Baggage). Pure functions of the request, so that `fuzz/` runs the very
//! code the 15008 listener runs.
//!
//! `forwarded` and `baggage` only describe the peer (for logs and
//! telemetry): one that cannot be read is set aside, as Istio's ztunnel
//! does, and never refuses the request.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, Method, Request, StatusCode};

use super::{headers, status};

/// A CONNECT request that may be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The pod and port to reach.
    pub target: SocketAddr,
    /// The `forwarded` header (empty when absent), or why it was set aside.
    pub forwarded: Result<Forwarded, String>,
    /// The `baggage` header (empty when absent), or why it was set aside.
    pub baggage: Result<Baggage, String>,
}

/// Reads a CONNECT received on a connection captured for the pod `dst`:
/// the request to serve, or the status to refuse it with and why.
pub fn parse_connect<B>(
    request: &Request<B>,
    dst: IpAddr,
) -> Result<Connect, (StatusCode, String)> {
    let target = check_connect(request, dst)?;
    let headers = request.headers();
    Ok(Connect {
        target,
        forwarded: forwarded_of(headers),
        baggage: baggage_of(headers),
    })
}

/// The part of [`parse_connect`] that decides: the target a CONNECT on a
/// connection captured for `dst` may reach, or the status to refuse it
/// with and why. The listener reads the peer's descriptive headers
/// ([`forwarded_of`], [`baggage_of`]) only when it uses them.
pub fn check_connect<B>(
    request: &Request<B>,
    dst: IpAddr,
) -> Result<SocketAddr, (StatusCode, String)> {
    let target = connect_target(request)?;
    // The tunnel may only reach the workload it was addressed to.
    if target.ip() != dst {
        return Err((
            status::BAD_REQUEST,
            format!("authority {target} is not the workload this connection was made to ({dst})"),
        ));
    }
    if crate::proxy::is_capture_port(target.port()) {
        return Err((
            status::UNREACHABLE,
            format!("authority {target} is one of ztunnel's own ports"),
        ));
    }
    Ok(target)
}

/// The `forwarded` header (empty when absent), or why it was set aside.
pub fn forwarded_of(headers: &HeaderMap) -> Result<Forwarded, String> {
    joined(headers, &headers::FORWARDED).and_then(|v| Forwarded::parse(&v))
}

/// The `baggage` header (empty when absent), or why it was set aside.
pub fn baggage_of(headers: &HeaderMap) -> Result<Baggage, String> {
    joined(headers, &headers::BAGGAGE).and_then(|v| Baggage::parse(&v))
}

/// The `ip:port` a request asks to reach, if it is a CONNECT naming one;
/// else the status to refuse it with and why (any HBONE server's first
/// check).
pub fn connect_target<B>(request: &Request<B>) -> Result<SocketAddr, (StatusCode, String)> {
    if request.method() != Method::CONNECT {
        return Err((
            status::BAD_REQUEST,
            format!("method {} is not CONNECT", request.method()),
        ));
    }
    let authority = request
        .uri()
        .authority()
        .ok_or((status::BAD_REQUEST, "no authority".to_string()))?;
    authority.as_str().parse().map_err(|_| {
        (
            status::BAD_REQUEST,
            format!("authority {authority} is not ip:port"),
        )
    })
}

/// Every value of the header `name`, as one comma-separated list (what
/// repeating a list header means in HTTP).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Result<String, String> {
    let mut values = Vec::new();
    for value in headers.get_all(name) {
        values.push(
            value
                .to_str()
                .map_err(|_| format!("`{name}` is not visible ASCII"))?,
        );
    }
    Ok(values.join(","))
}

/// RFC 7230's `tchar`: what a token is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `s` is an RFC 7230 token (a `baggage` key, a `forwarded` name).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// A `forwarded` header: its elements (nearest the client first), each a
/// list of `name=value` pairs with names lower-cased and quoted values
/// unquoted. Empty elements are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded(pub Vec<Vec<(String, String)>>);

impl Forwarded {
    /// Parses a header value strictly by RFC 7239's grammar (whitespace
    /// allowed around `,` and `;`).
    pub fn parse(value: &str) -> Result<Self, String> {
        let b = value.as_bytes();
        let mut i = 0;
        let ows = |i: &mut usize| {
            while matches!(b.get(*i), Some(b' ' | b'\t')) {
                *i += 1;
            }
        };
        let mut elements = Vec::new();
        let mut element: Vec<(String, String)> = Vec::new();
        loop {
            ows(&mut i);
            if b.get(i).copied().is_some_and(is_tchar) {
                let start = i;
                while b.get(i).copied().is_some_and(is_tchar) {
                    i += 1;
                }
                let name = value[start..i].to_ascii_lowercase();
                if b.get(i) != Some(&b'=') {
                    return Err(format!("forwarded: `{name}` has no value"));
                }
                i += 1;
                let v = if b.get(i) == Some(&b'"') {
                    quoted(b, &mut i)?
                } else {
                    let start = i;
                    while b.get(i).copied().is_some_and(is_tchar) {
                        i += 1;
                    }
                    if start == i {
                        return Err(format!("forwarded: `{name}` has an empty value"));
                    }
                    value[start..i].to_string()
                };
                if element.iter().any(|(n, _)| *n == name) {
                    return Err(format!("forwarded: `{name}` twice in one element"));
                }
                element.push((name, v));
                ows(&mut i);
            }
            match b.get(i) {
                None => break,
                Some(b';') => i += 1,
                Some(b',') => {
                    i += 1;
                    if !element.is_empty() {
                        elements.push(std::mem::take(&mut element));
                    }
                }
                Some(_) => {
                    return Err(format!(
                        "forwarded: unexpected character at byte {i} of {value:?}"
                    ))
                }
            }
        }
        if !element.is_empty() {
            elements.push(element);
        }
        Ok(Forwarded(elements))
    }

    /// The value of `name` in the element nearest the client.
    pub fn first(&self, name: &str) -> Option<&str> {
        self.0
            .first()?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A quoted-string starting at `b[*i]` (a `"`), unescaped; `*i` ends past
/// its closing quote.
fn quoted(b: &[u8], i: &mut usize) -> Result<String, String> {
    let text = |c: u8| c == b'\t' || (b' '..=b'~').contains(&c);
    let mut out = Vec::new();
    *i += 1;
    loop {
        match b.get(*i) {
            None => return Err("forwarded: a quoted value is not closed".into()),
            Some(b'"') => break,
            Some(b'\\') => match b.get(*i + 1) {
                Some(&c) if text(c) => {
                    out.push(c);
                    *i += 2;
                }
                _ => return Err("forwarded: a bad escape in a quoted value".into()),
            },
            Some(&c) if text(c) => {
                out.push(c);
                *i += 1;
            }
            Some(_) => return Err("forwarded: a control character in a quoted value".into()),
        }
    }
    *i += 1;
    // Only ASCII was pushed.
    String::from_utf8(out).map_err(|_| "forwarded: not ASCII".to_string())
}

/// A `baggage` header: its members' keys and values, member properties
/// dropped, empty members skipped. Values are kept as sent, not
/// percent-decoded: no ztunnel encodes them (Istio's reads them raw too),
/// so decoding would only make `%` in a value mean something else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage(pub Vec<(String, String)>);

impl Baggage {
    /// More members than this and the header is set aside (the W3C's
    /// limit on what must be propagated).
    pub const MAX_MEMBERS: usize = 64;

    /// Parses a header value by the W3C Baggage grammar.
    pub fn parse(value: &str) -> Result<Self, String> {
        // W3C's baggage-octet: visible ASCII but `"`, `,`, `;` and `\`.
        let octet = |c: u8| c.is_ascii_graphic() && !b"\",;\\".contains(&c);
        let ows: &[char] = &[' ', '\t'];
        let mut members = Vec::new();
        for member in value.split(',') {
            let member = member.trim_matches(ows);
            if member.is_empty() {
                continue;
            }
            if members.len() == Self::MAX_MEMBERS {
                return Err(format!("baggage: more than {} members", Self::MAX_MEMBERS));
            }
            let mut parts = member.split(';');
            let head = parts.next().unwrap_or_default();
            let (key, v) = head
                .split_once('=')
                .ok_or_else(|| format!("baggage: member {member:?} has no `=`"))?;
            let (key, v) = (key.trim_end_matches(ows), v.trim_matches(ows));
            if !is_token(key) {
                return Err(format!("baggage: {key:?} is not a key"));
            }
            if !v.bytes().all(octet) {
                return Err(format!("baggage: the value of `{key}` has a bad character"));
            }
            for property in parts {
                let (pk, pv) = property.split_once('=').unwrap_or((property, ""));
                let (pk, pv) = (pk.trim_matches(ows), pv.trim_matches(ows));
                if !is_token(pk) || !pv.bytes().all(octet) {
                    return Err(format!("baggage: `{key}` has a bad property"));
                }
            }
            members.push((key.to_string(), v.to_string()));
        }
        Ok(Baggage(members))
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(authority: &str, headers: &[(&str, &str)]) -> Result<Connect, (StatusCode, String)> {
        let mut builder = Request::builder().method(Method::CONNECT).uri(authority);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        parse_connect(&builder.body(()).unwrap(), "10.0.0.2".parse().unwrap())
    }

    #[test]
    fn a_connect_as_ztunnel_sends_it_is_read_whole() {
        let c = connect(
            "10.0.0.2:8080",
            &[
                ("forwarded", "for=\"10.0.0.1:40000\";host=echo.default.svc"),
                ("baggage", "k8s.namespace.name=shop,service.version=v1"),
            ],
        )
        .unwrap();
        assert_eq!(c.target, "10.0.0.2:8080".parse().unwrap());
        let forwarded = c.forwarded.unwrap();
        assert_eq!(forwarded.first("for"), Some("10.0.0.1:40000"));
        assert_eq!(forwarded.first("host"), Some("echo.default.svc"));
        let baggage = c.baggage.unwrap();
        assert_eq!(baggage.get("k8s.namespace.name"), Some("shop"));
        assert_eq!(baggage.get("service.version"), Some("v1"));
    }

    #[test]
    fn only_a_connect_to_the_captured_pod_is_served() {
        let refused = |authority: &str| connect(authority, &[]).unwrap_err().0;
        assert_eq!(refused("10.0.0.3:8080"), StatusCode::BAD_REQUEST);
        assert_eq!(refused("echo:8080"), StatusCode::BAD_REQUEST);
        assert_eq!(refused("[::ffff:10.0.0.2]:8080"), StatusCode::BAD_REQUEST);
        assert_eq!(refused("10.0.0.2:15008"), StatusCode::SERVICE_UNAVAILABLE);
        let get = Request::builder()
            .uri("http://10.0.0.2:80/")
            .body(())
            .unwrap();
        let dst = "10.0.0.2".parse().unwrap();
        assert_eq!(
            parse_connect(&get, dst).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn unreadable_peer_headers_are_set_aside_not_refused() {
        let c = connect(
            "10.0.0.2:8080",
            &[("forwarded", "for=\"unclosed"), ("baggage", "no-equals")],
        )
        .unwrap();
        assert!(c.forwarded.is_err() && c.baggage.is_err(), "{c:?}");
        let c = connect("10.0.0.2:8080", &[]).unwrap();
        assert_eq!(c.forwarded, Ok(Forwarded::default()));
        assert_eq!(c.baggage, Ok(Baggage::default()));
    }

    #[test]
    fn forwarded_follows_rfc_7239() {
        let f =
            Forwarded::parse("For=\"[2001:db8::1]:4711\";proto=https, ;, for=192.0.2.43").unwrap();
        assert_eq!(
            f.0,
            vec![
                vec![
                    ("for".to_string(), "[2001:db8::1]:4711".to_string()),
                    ("proto".to_string(), "https".to_string())
                ],
                vec![("for".to_string(), "192.0.2.43".to_string())],
            ]
        );
        assert_eq!(
            Forwarded::parse(r#"for="a\"b\\c""#).unwrap().first("for"),
            Some("a\"b\\c")
        );
        for bad in [
            "for",
            "for=",
            "for=a;for=b",
            "for=\"a",
            "for=\"a\\",
            "for=[::1]",
            "for=a b",
            "for=\"\u{1}\"",
            "=a",
        ] {
            assert!(Forwarded::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn baggage_follows_the_w3c_grammar() {
        let b = Baggage::parse(" a = 1 ;p;q=2 , b=%2C=x ,, c=").unwrap();
        assert_eq!(
            b.0,
            [("a", "1"), ("b", "%2C=x"), ("c", "")].map(|(k, v)| (k.into(), v.into()))
        );
        for bad in [
            "a",
            "=1",
            "a b=1",
            "a=\"1\"",
            "a=1\\",
            "a=1;=2",
            "a=1;p=\"x\"",
        ] {
            assert!(Baggage::parse(bad).is_err(), "{bad:?}");
        }
        let many = vec!["k=v"; Baggage::MAX_MEMBERS + 1].join(",");
        assert!(Baggage::parse(&many).is_err());
        assert!(Baggage::parse(&many[4..]).is_ok());
    }
}
