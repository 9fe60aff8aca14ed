//! The one authority (host and port) of a request: what policies and routes
//! see, and what the backend gets. A request that names two (two `Host`
//! headers, or a `Host` that disagrees with HTTP/2's `:authority`) is
//! refused, so a policy can never check one name while the backend serves
//! another.

use http::{header, HeaderMap, Uri, Version};

/// Why a request's authority was refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("more than one Host header")]
    TwoHosts,
    #[error("the Host header is not a host name")]
    Unreadable,
    #[error("the Host header and the request's authority differ")]
    Disagree,
    #[error("an HTTP/1.1 request without a Host header")]
    Missing,
}

/// The request's authority, lower-cased, without a trailing dot on the
/// host: from HTTP/2's `:authority` or an absolute-form target (RFC 9112
/// 3.2.2: it wins over `Host`), else the `Host` header.
pub fn of_request(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<String, AuthorityError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(AuthorityError::TwoHosts);
    }
    let host = host
        .map(|h| h.to_str().map_err(|_| AuthorityError::Unreadable))
        .transpose()?;
    let chosen = match (uri.authority().map(|a| a.as_str()), host) {
        (Some(from_uri), Some(h)) if version == Version::HTTP_2 => {
            if !normalize(from_uri).eq(&normalize(h)) {
                return Err(AuthorityError::Disagree);
            }
            from_uri
        }
        (Some(from_uri), _) => from_uri,
        (None, Some(h)) => h,
        (None, None) if version == Version::HTTP_11 => return Err(AuthorityError::Missing),
        (None, None) => "",
    };
    if chosen
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@')
    {
        return Err(AuthorityError::Unreadable);
    }
    Ok(normalize(chosen))
}

/// Lower case, and `name.:port` as `name:port`.
fn normalize(authority: &str) -> String {
    let lower = authority.to_ascii_lowercase();
    // A bracketed IPv6 literal without a port ends in `]`: no port split.
    match lower.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => {
            format!("{}:{port}", host.strip_suffix('.').unwrap_or(host))
        }
        _ => lower.strip_suffix('.').map(str::to_string).unwrap_or(lower),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for host in hosts {
            h.append(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        h
    }

    #[test]
    fn one_authority_lowercased_without_trailing_dot() {
        let origin: Uri = "/x".parse().unwrap();
        assert_eq!(
            of_request(Version::HTTP_11, &origin, &headers(&["Admin.SVC."])).unwrap(),
            "admin.svc"
        );
        assert_eq!(
            of_request(Version::HTTP_11, &origin, &headers(&["admin.svc.:8080"])).unwrap(),
            "admin.svc:8080"
        );
        let absolute: Uri = "http://Admin.svc/x".parse().unwrap();
        assert_eq!(
            of_request(Version::HTTP_11, &absolute, &headers(&["public.svc"])).unwrap(),
            "admin.svc",
            "an absolute-form target wins over Host, as the backend reads it"
        );
    }

    #[test]
    fn two_names_for_one_request_are_refused() {
        let origin: Uri = "/x".parse().unwrap();
        assert_eq!(
            of_request(Version::HTTP_11, &origin, &headers(&["a.svc", "b.svc"])),
            Err(AuthorityError::TwoHosts)
        );
        let h2: Uri = "http://admin.svc/x".parse().unwrap();
        assert_eq!(
            of_request(Version::HTTP_2, &h2, &headers(&["public.svc"])),
            Err(AuthorityError::Disagree)
        );
        assert_eq!(
            of_request(Version::HTTP_2, &h2, &headers(&["ADMIN.svc"])).unwrap(),
            "admin.svc"
        );
        assert_eq!(
            of_request(Version::HTTP_11, &origin, &headers(&[])),
            Err(AuthorityError::Missing)
        );
        assert_eq!(
            of_request(Version::HTTP_10, &origin, &headers(&[])).unwrap(),
            ""
        );
    }
}
