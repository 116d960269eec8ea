//! Path normalisation for location matching, as nginx does it: percent-decoding, merged
//! slashes, `.` and `..` segments resolved. Matching on the normalised path is what makes
//! `location ~* \.env$ { deny all; }` hold against `/%2eenv` or `/a/../.env`.

use std::borrow::Cow;

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
    normalize_path_cow(path).map(Cow::into_owned)
}

/// [`normalize_path`] that borrows `path` when it is already normal: no `%`, no empty,
/// `.` or `..` segment. That is nearly every real request, and then routing allocates
/// nothing for the path.
pub(crate) fn normalize_path_cow(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slow(path).map(Cow::Owned)
}

/// Starts with `/`, and has no `%` (so nothing to decode, and no NUL), no `//`, and no
/// segment that is `.` or `..`.
fn is_normal(bytes: &[u8]) -> bool {
    if bytes.first() != Some(&b'/') || bytes.contains(&b'%') {
        return false;
    }
    // Every segment, including the empty one after a trailing slash, is the text between
    // two slashes; only the last may be empty.
    let mut segments = bytes[1..].split(|c| *c == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            b"" if !last => return false,
            b"." | b".." => return false,
            _ => {}
        }
    }
    true
}

fn normalize_slow(path: &str) -> Result<String, PathError> {
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

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/", "/a/b.c/d", "/.env", "/a/...", "/a/.b"] {
            assert!(matches!(normalize_path_cow(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in ["//", "/a//b", "/a/./b", "/a/..", "/a/.", "/%41", ""] {
            assert!(
                !matches!(normalize_path_cow(p), Ok(Cow::Borrowed(_))),
                "{p}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn fast_path_agrees_with_full_normalisation(p in "[a-z./%0-9A-F]{0,40}") {
            proptest::prop_assert_eq!(
                normalize_path_cow(&p).map(Cow::into_owned),
                normalize_slow(&p)
            );
        }

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
