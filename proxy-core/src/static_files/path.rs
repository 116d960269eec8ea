//! The strict request-path check that runs before any file system access.
//!
//! ServeDir has its own checks (it refuses `..` components); this one runs first so that
//! malformed or hostile paths get a clear 400 instead of a file system lookup, and so that
//! the rules are ours, written down and property-tested:
//!
//! - the path starts with `/`;
//! - every `%` is followed by two hex digits;
//! - no byte decodes to NUL, and no `%2f` / `%5c` (an encoded `/` or `\`: a path separator
//!   smuggled past the router's matching);
//! - no raw `\` (a separator on some platforms);
//! - no segment is `.` or `..` once decoded (`%2e%2e` included). Browsers remove dot
//!   segments before sending, so only hand-made requests contain them.
//!
//! The check is one pass over the bytes, allocates nothing and cannot panic.

use std::fmt;

/// Why a request path was refused (always answered with 400 Bad Request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// A NUL byte, raw or `%00`.
    Nul,
    /// An encoded `/` or `\`, or a raw `\`.
    Separator,
    /// A `.` or `..` segment, raw or encoded.
    DotSegment,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "path does not start with '/'",
            PathError::BadEscape => "invalid percent-encoding in path",
            PathError::Nul => "NUL byte in path",
            PathError::Separator => "encoded or backslash path separator",
            PathError::DotSegment => "dot segment in path",
        })
    }
}

impl std::error::Error for PathError {}

/// Checks a raw (still percent-encoded) request path: it must start with `/`, have only
/// well-formed `%XX` escapes, no NUL, no encoded `/` or `\`, no raw `\`, and no `.` or
/// `..` segment (raw or encoded). One pass, no allocation, never panics.
pub fn check_path(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Per segment: its decoded length and whether every decoded byte was a dot.
    let mut seg_len = 0usize;
    let mut seg_dots = true;
    let mut i = 0usize;
    while i < bytes.len() {
        let raw = bytes[i];
        let decoded = if raw == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex);
            let lo = bytes.get(i + 2).copied().and_then(hex);
            match (hi, lo) {
                (Some(hi), Some(lo)) => {
                    i += 3;
                    let b = (hi << 4) | lo;
                    if b == b'/' || b == b'\\' {
                        return Err(PathError::Separator);
                    }
                    b
                }
                _ => return Err(PathError::BadEscape),
            }
        } else {
            i += 1;
            if raw == b'/' {
                end_segment(seg_len, seg_dots)?;
                seg_len = 0;
                seg_dots = true;
                continue;
            }
            if raw == b'\\' {
                return Err(PathError::Separator);
            }
            raw
        };
        if decoded == 0 {
            return Err(PathError::Nul);
        }
        seg_len += 1;
        seg_dots &= decoded == b'.';
    }
    end_segment(seg_len, seg_dots)
}

fn end_segment(len: usize, dots: bool) -> Result<(), PathError> {
    if dots && (len == 1 || len == 2) {
        Err(PathError::DotSegment)
    } else {
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "/",
            "/a",
            "/static/app.css",
            "/dir/",
            "//double//slash",
            "/a.b/c..d/...",
            "/%41%62c",
            "/caf%C3%A9",
            "/.well-known/x",
        ] {
            assert_eq!(check_path(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn refuses_hostile_paths() {
        let cases = [
            ("", PathError::NotAbsolute),
            ("a/b", PathError::NotAbsolute),
            ("/..", PathError::DotSegment),
            ("/../etc/passwd", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a/.", PathError::DotSegment),
            ("/%2e%2e/x", PathError::DotSegment),
            ("/.%2E/x", PathError::DotSegment),
            ("/a%2fb", PathError::Separator),
            ("/a%2F..%2Fb", PathError::Separator),
            ("/a%5cb", PathError::Separator),
            ("/a\\b", PathError::Separator),
            ("/a%00", PathError::Nul),
            ("/a\0", PathError::Nul),
            ("/a%", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/a%%41", PathError::BadEscape),
        ];
        for (p, e) in cases {
            assert_eq!(check_path(p), Err(e), "{p:?}");
        }
    }

    /// Percent-decodes a path that `check_path` accepted (test oracle, allocates).
    fn decode(p: &str) -> Vec<u8> {
        let b = p.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let h = hex(b[i + 1]).unwrap();
                let l = hex(b[i + 2]).unwrap();
                out.push(h << 4 | l);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn never_panics(s in any::<String>()) {
            let _ = check_path(&s);
        }

        #[test]
        fn accepted_paths_stay_inside(s in "(/([a-z.]|%2[eEfF]|%5[cC]|%00|%4[0-9]|\\\\){0,6}){1,6}") {
            if check_path(&s).is_ok() {
                let d = decode(&s);
                prop_assert!(!d.contains(&0));
                prop_assert!(!d.contains(&b'\\'));
                // Decoded segments are exactly the raw segments decoded (no new '/').
                prop_assert_eq!(d.iter().filter(|&&c| c == b'/').count(),
                                s.bytes().filter(|&c| c == b'/').count());
                for seg in d.split(|&c| c == b'/') {
                    prop_assert!(seg != b"." && seg != b"..");
                }
            }
        }

        #[test]
        fn encoded_dot_dot_always_refused(pre in "(/[a-z]{1,3}){0,3}", post in "(/[a-z]{1,3}){0,3}",
                                          dd in "(\\.|%2[eE])(\\.|%2[eE])") {
            let p = format!("{pre}/{dd}{post}");
            prop_assert_eq!(check_path(&p), Err(PathError::DotSegment));
        }
    }
}
