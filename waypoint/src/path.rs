//! Request paths in one canonical form before anything matches on them, as
//! Istio normalizes them for its policies: otherwise `/admin` denied could
//! be reached as `//admin`, `/x/../admin`, `/%61dmin` or `/x%2F..%2Fadmin`.
//! The backend receives the normalized path too, so what was checked is
//! what is served.

/// Why a path was refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-encoding in the path")]
    BadEscape,
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the path is not UTF-8 once decoded")]
    NotUtf8,
    /// Some servers (IIS, some Java ones) take `\` for `/`: the path would
    /// mean one thing to policy and another to the backend.
    #[error("a backslash in the path")]
    Backslash,
    /// `..;x` is `..` to Tomcat and Spring, and a name to everyone else.
    #[error("a dot segment with parameters (`..;` or `.;`) in the path")]
    DotSegmentParameters,
}

/// The normalized form of `path` (without its query): percent-escapes of
/// unreserved characters and of `/` decoded and the others upper-cased,
/// runs of `/` merged, and `.` and `..` segments resolved (never above
/// the root).
pub fn normalize(path: &str) -> Result<String, PathError> {
    if path == "*" {
        return Ok(path.to_string());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode(path)?;
    if decoded.contains('\\') {
        return Err(PathError::Backslash);
    }
    if decoded
        .split('/')
        .any(|s| matches!(s.split_once(';'), Some((".." | ".", _))))
    {
        return Err(PathError::DotSegmentParameters);
    }
    let trailing_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing_slash && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

/// Decodes the escapes that mean the same as their character; keeps (in
/// upper case) the ones that do not. Works on bytes: a path may carry raw
/// UTF-8, which must reach the backend as it came.
fn decode(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = |b: u8| (b as char).to_digit(16);
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = (hi * 16 + lo) as u8;
        // `%5C` is decoded so that it is refused like a raw backslash.
        if c.is_ascii_alphanumeric() || b"-._~/\\".contains(&c) {
            out.push(c);
        } else {
            out.extend_from_slice(format!("%{c:02X}").as_bytes());
        }
        i += 3;
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_path_is_one_path() {
        for spelling in [
            "/admin",
            "//admin",
            "/x/../admin",
            "/./admin",
            "/%61dmin",
            "/x%2F..%2Fadmin",
            "/../../admin",
            "/x/%2E%2E/admin",
        ] {
            assert_eq!(normalize(spelling).unwrap(), "/admin", "{spelling}");
        }
    }

    #[test]
    fn trailing_slashes_and_other_escapes_are_kept() {
        assert_eq!(normalize("/a/b/").unwrap(), "/a/b/");
        assert_eq!(normalize("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("/..").unwrap(), "/");
        assert_eq!(normalize("/a%20b%3f").unwrap(), "/a%20b%3F");
        assert_eq!(normalize("*").unwrap(), "*");
    }

    #[test]
    fn raw_utf8_is_kept_as_it_came() {
        assert_eq!(normalize("/caf\u{e9}/x").unwrap(), "/caf\u{e9}/x");
    }

    #[test]
    fn spellings_that_backends_read_differently_are_refused() {
        assert_eq!(
            normalize("/public/..;/admin"),
            Err(PathError::DotSegmentParameters)
        );
        assert_eq!(
            normalize("/public/.;x/admin"),
            Err(PathError::DotSegmentParameters)
        );
        assert_eq!(normalize("/public\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(normalize("/public%5C..%5Cadmin"), Err(PathError::Backslash));
        // Parameters on a name are the name's business.
        assert_eq!(normalize("/a;v=1/b").unwrap(), "/a;v=1/b");
    }

    #[test]
    fn malformed_paths_are_refused() {
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("a"), Err(PathError::NotAbsolute));
    }
}
