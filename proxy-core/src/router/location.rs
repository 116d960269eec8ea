//! Location matching with nginx's precedence.

use std::collections::HashMap;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

/// How a location matches the normalised request path (nginx's modifiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `location = /x`: exactly this path.
    Exact(String),
    /// `location /x`: paths starting with this prefix.
    Prefix(String),
    /// `location ^~ /x`: a prefix that, when it is the longest match, stops the regex search.
    PrefixNoRegex(String),
    /// `location ~ re`: a case-sensitive regular expression.
    Regex(String),
    /// `location ~* re`: a case-insensitive regular expression.
    RegexCaseless(String),
}

impl Pattern {
    /// Parse nginx's syntax: `= /x`, `^~ /x`, `~ re`, `~* re` or `/x`.
    ///
    /// ```
    /// use proxy_core::router::Pattern;
    /// assert_eq!(Pattern::parse("= /login"), Some(Pattern::Exact("/login".into())));
    /// assert_eq!(Pattern::parse("~* \\.php$"), Some(Pattern::RegexCaseless("\\.php$".into())));
    /// assert_eq!(Pattern::parse("/static/"), Some(Pattern::Prefix("/static/".into())));
    /// assert_eq!(Pattern::parse("static"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Pattern> {
        let s = s.trim();
        let (modifier, rest) = match s.split_once(char::is_whitespace) {
            Some((m, rest)) if matches!(m, "=" | "^~" | "~" | "~*") => (m, rest.trim()),
            _ => ("", s),
        };
        if rest.is_empty() {
            return None;
        }
        let path_like = rest.starts_with('/');
        match modifier {
            "=" if path_like => Some(Pattern::Exact(rest.to_owned())),
            "^~" if path_like => Some(Pattern::PrefixNoRegex(rest.to_owned())),
            "~" => Some(Pattern::Regex(rest.to_owned())),
            "~*" => Some(Pattern::RegexCaseless(rest.to_owned())),
            "" if path_like => Some(Pattern::Prefix(rest.to_owned())),
            _ => None,
        }
    }

    /// Compile the regex of a regex pattern, to check it up front.
    pub fn compile(&self) -> Result<Option<Regex>, regex::Error> {
        match self {
            Pattern::Regex(r) => RegexBuilder::new(r).size_limit(1 << 20).build().map(Some),
            Pattern::RegexCaseless(r) => RegexBuilder::new(r)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map(Some),
            _ => Ok(None),
        }
    }
}

/// A compiled set of location patterns; [`Locations::find`] returns the index of the
/// winning one, following nginx: an exact match wins; else the longest prefix is
/// remembered, and wins at once if it is `^~`; else the regexes are tried in
/// configuration order and the first match wins; else the longest prefix.
#[derive(Debug, Clone)]
pub struct Locations {
    exact: HashMap<String, usize>,
    /// (prefix, index, stops regex search), longest first.
    prefixes: Vec<(String, usize, bool)>,
    regexes: Option<RegexSet>,
    /// Location index of each regex in `regexes`, in configuration order.
    regex_index: Vec<usize>,
}

impl Locations {
    /// Compile `patterns` (index = position).
    ///
    /// ```
    /// use proxy_core::router::{Locations, Pattern};
    /// let l = Locations::new(&[
    ///     Pattern::Prefix("/".into()),
    ///     Pattern::Exact("/".into()),
    ///     Pattern::PrefixNoRegex("/images/".into()),
    ///     Pattern::RegexCaseless("\\.(gif|jpg)$".into()),
    /// ]).unwrap();
    /// assert_eq!(l.find("/"), Some(1));
    /// assert_eq!(l.find("/index.html"), Some(0));
    /// assert_eq!(l.find("/images/1.gif"), Some(2));
    /// assert_eq!(l.find("/docs/1.JPG"), Some(3));
    /// ```
    pub fn new(patterns: &[Pattern]) -> Result<Self, regex::Error> {
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        let mut regex_src = Vec::new();
        let mut regex_index = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            match p {
                Pattern::Exact(s) => {
                    exact.entry(s.clone()).or_insert(i);
                }
                Pattern::Prefix(s) => prefixes.push((s.clone(), i, false)),
                Pattern::PrefixNoRegex(s) => prefixes.push((s.clone(), i, true)),
                Pattern::Regex(r) => {
                    regex_src.push(r.clone());
                    regex_index.push(i);
                }
                Pattern::RegexCaseless(r) => {
                    regex_src.push(format!("(?i:{r})"));
                    regex_index.push(i);
                }
            }
        }
        // Longest first; among equal prefixes the first configured wins (stable sort).
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        let regexes = if regex_src.is_empty() {
            None
        } else {
            Some(
                RegexSetBuilder::new(&regex_src)
                    .size_limit(1 << 22)
                    .build()?,
            )
        };
        Ok(Locations {
            exact,
            prefixes,
            regexes,
            regex_index,
        })
    }

    /// The index of the location that handles `path` (already normalised).
    pub fn find(&self, path: &str) -> Option<usize> {
        // An empty map still hashes the key: skip it when there are no exact locations.
        if !self.exact.is_empty() {
            if let Some(&i) = self.exact.get(path) {
                return Some(i);
            }
        }
        let prefix = self
            .prefixes
            .iter()
            .find(|(p, _, _)| path.starts_with(p.as_str()));
        if let Some((_, i, true)) = prefix {
            return Some(*i);
        }
        if let Some(set) = &self.regexes {
            // RegexSet reports every match; the lowest index is the first configured.
            if let Some(first) = set.matches(path).iter().next() {
                return self.regex_index.get(first).copied();
            }
        }
        prefix.map(|(_, i, _)| *i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locs(specs: &[&str]) -> Locations {
        let patterns: Vec<Pattern> = specs.iter().map(|s| Pattern::parse(s).unwrap()).collect();
        Locations::new(&patterns).unwrap()
    }

    #[test]
    fn exact_match_wins_over_everything() {
        let l = locs(&["/", "~ ^/login$", "^~ /login", "= /login"]);
        assert_eq!(l.find("/login"), Some(3));
        assert_eq!(l.find("/login/x"), Some(2));
    }

    #[test]
    fn longest_prefix_is_remembered_and_used_when_no_regex_matches() {
        let l = locs(&["/", "/api/", "/api/v1/", "~ \\.php$"]);
        assert_eq!(l.find("/api/v1/users"), Some(2));
        assert_eq!(l.find("/api/v2"), Some(1));
        assert_eq!(l.find("/other"), Some(0));
    }

    #[test]
    fn regex_beats_a_plain_longest_prefix() {
        let l = locs(&["/", "/api/", "~ \\.php$"]);
        assert_eq!(l.find("/api/x.php"), Some(2));
    }

    #[test]
    fn caret_tilde_prefix_stops_the_regex_search_only_when_longest() {
        let l = locs(&["^~ /images/", "/images/big/", "~* \\.gif$"]);
        // ^~ is the longest match: regexes are skipped.
        assert_eq!(l.find("/images/a.gif"), Some(0));
        // A longer plain prefix matches: the regex search happens and wins.
        assert_eq!(l.find("/images/big/a.gif"), Some(2));
        assert_eq!(l.find("/images/big/a.png"), Some(1));
    }

    #[test]
    fn first_matching_regex_in_configuration_order_wins() {
        let l = locs(&["~ /a", "~* /A/B", "~ /a/b"]);
        assert_eq!(l.find("/a/b"), Some(0));
        let l = locs(&["~ ^/x/y", "~ ^/x"]);
        assert_eq!(l.find("/x/y"), Some(0));
        assert_eq!(l.find("/x/z"), Some(1));
    }

    #[test]
    fn case_sensitivity_of_regexes() {
        let l = locs(&["~ \\.PHP$", "~* \\.jpg$"]);
        assert_eq!(l.find("/a.php"), None);
        assert_eq!(l.find("/a.PHP"), Some(0));
        assert_eq!(l.find("/a.JpG"), Some(1));
    }

    #[test]
    fn no_match_is_none() {
        let l = locs(&["/api/", "= /x"]);
        assert_eq!(l.find("/other"), None);
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in ["", "=", "= relative", "^~ rel", "relative", "~"] {
            assert_eq!(Pattern::parse(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the paths, the winner is an exact match if one exists, and a prefix
        /// winner is always the longest matching prefix.
        #[test]
        fn precedence_holds(prefixes in proptest::collection::vec("/[ab]{0,3}", 1..6), path in "/[ab/]{0,6}") {
            let specs: Vec<String> = prefixes.clone();
            let refs: Vec<&str> = specs.iter().map(String::as_str).collect();
            let l = locs(&refs);
            if let Some(i) = l.find(&path) {
                let longest = specs.iter().filter(|p| path.starts_with(p.as_str())).map(|p| p.len()).max();
                proptest::prop_assert_eq!(Some(specs[i].len()), longest);
            } else {
                proptest::prop_assert!(!specs.iter().any(|p| path.starts_with(p.as_str())));
            }
        }
    }
}
