//! Fuzz entry point for the router's parsers: location patterns, path normalisation and
//! nginx's location precedence, checked against a plain reference model.

use super::location::{Locations, Pattern};
use super::path::normalize_path;

/// At most this many patterns per input, so one input stays cheap to compile.
const MAX_PATTERNS: usize = 16;

/// Fuzz entry point: every line but the last is a `location` pattern in nginx syntax, the
/// last line is a request path. Whatever normalises must be normal (absolute, no empty,
/// `.` or `..` segment), and the location found must be the one nginx's precedence picks.
#[doc(hidden)]
pub fn fuzz_route(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = text.lines().collect();
    let Some(path) = lines.pop() else {
        return;
    };
    let patterns: Vec<Pattern> = lines
        .iter()
        .take(MAX_PATTERNS)
        .filter_map(|l| Pattern::parse(l))
        .collect();
    let Ok(path) = normalize_path(path) else {
        return;
    };
    assert!(path.starts_with('/'), "not absolute: {path:?}");
    for segment in path[1..].split('/').rev().skip(1) {
        assert!(
            !matches!(segment, "" | "." | ".."),
            "segment {segment:?} left in {path:?}"
        );
    }
    if patterns.iter().any(|p| p.compile().is_err()) {
        return;
    }
    let Ok(locations) = Locations::new(&patterns) else {
        return;
    };
    assert_eq!(
        locations.find(&path),
        reference(&patterns, &path),
        "{path:?}"
    );
}

/// nginx's order, written the slow and obvious way: the first exact match; else the
/// longest prefix (first configured among equals), final if `^~`; else the first regex
/// in configuration order; else that prefix.
fn reference(patterns: &[Pattern], path: &str) -> Option<usize> {
    if let Some(i) = patterns
        .iter()
        .position(|p| matches!(p, Pattern::Exact(s) if s == path))
    {
        return Some(i);
    }
    let mut best: Option<(usize, usize, bool)> = None;
    for (i, p) in patterns.iter().enumerate() {
        let (prefix, stop) = match p {
            Pattern::Prefix(s) => (s, false),
            Pattern::PrefixNoRegex(s) => (s, true),
            _ => continue,
        };
        if path.starts_with(prefix.as_str()) && best.is_none_or(|(_, len, _)| prefix.len() > len) {
            best = Some((i, prefix.len(), stop));
        }
    }
    if let Some((i, _, true)) = best {
        return Some(i);
    }
    let regex = patterns.iter().position(|p| {
        p.compile()
            .ok()
            .flatten()
            .is_some_and(|re| re.is_match(path))
    });
    regex.or(best.map(|(i, _, _)| i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass() {
        fuzz_route(b"/\n= /\n^~ /images/\n~* \\.(gif|jpg)$\n/images/a.GIF");
        fuzz_route(b"/api/\n~ ^/api/v[0-9]+/\n/api/v2/users/../items");
        fuzz_route(b"= /x\n/x");
        fuzz_route(b"/a%2f%2e%2e/b");
    }
}
