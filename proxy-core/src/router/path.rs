//! Path normalisation for location matching, as nginx does it: percent-decoding, merged
//! slashes, `.` and `..` segments resolved. Matching on the normalised path is what makes
//! `location ~* \.env$ { deny all; }` hold against `/%2eenv` or `/a/../.env`.

/// Why a path cannot be routed (the client gets a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/` (and is not `*`).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// A decoded NUL byte.
    Nul,
    /// `..` climbs above the root.
    AboveRoot,
}

/// The normalised form of `path` (without the query). Linear in the input, one
/// allocation. Bytes that do not form UTF-8 after decoding are replaced with U+FFFD.
///
/// ```
/// use proxy_core::router::normalize_path;
/// assert_eq!(normalize_path("/a//b/./c/../%2eenv").unwrap(), "/a/b/.env");
/// assert!(normalize_path("/../etc/passwd").is_err());
/// assert!(normalize_path("/a%00b").is_err());
/// ```
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| hex(*c));
            let lo = bytes.get(i + 2).and_then(|c| hex(*c));
            match (hi, lo) {
                (Some(h), Some(l)) => decoded.push(h << 4 | l),
                _ => return Err(PathError::BadEscape),
            }
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    if decoded.contains(&0) {
        return Err(PathError::Nul);
    }
    // Resolve segments: a stack of segment start offsets into `out`.
    let mut out: Vec<u8> = Vec::with_capacity(decoded.len());
    let mut starts: Vec<usize> = Vec::new();
    let ends_with_slash = decoded.last() == Some(&b'/');
    let mut trailing = ends_with_slash;
    for seg in decoded.split(|c| *c == b'/') {
        match seg {
            b"" => {}
            b"." => trailing = true,
            b".." => {
                let start = starts.pop().ok_or(PathError::AboveRoot)?;
                out.truncate(start);
                trailing = true;
            }
            _ => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(seg);
                trailing = ends_with_slash;
            }
        }
    }
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    Ok(match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases() {
        for (input, want) in [
            ("/", "/"),
            ("//", "/"),
            ("/a/", "/a/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/a/b/../../c", "/c"),
            ("/static/%2e%2e/x", "/x"),
            ("/a%2Fb", "/a/b"),
            ("/%41", "/A"),
        ] {
            assert_eq!(normalize_path(input).unwrap(), want, "{input}");
        }
        assert_eq!(normalize_path("a"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/%2e%2e/"), Err(PathError::AboveRoot));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_is_idempotent(p in "/[a-z./%0-9A-F]{0,40}") {
            if let Ok(n) = normalize_path(&p) {
                proptest::prop_assert!(n.starts_with('/'));
                proptest::prop_assert!(!n.contains("//"));
                proptest::prop_assert!(!n.split('/').any(|s| s == ".." || s == "."));
                if !n.contains('%') {
                    proptest::prop_assert_eq!(normalize_path(&n).unwrap(), n);
                }
            }
        }
    }
}
