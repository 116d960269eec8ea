//! Virtual server names: exact names, `*.example.com` and `example.*` wildcards.

use std::borrow::Cow;

/// One `server_name` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerName {
    /// An exact host name (compared case-insensitively).
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (stored as `.example.com`).
    LeadingWildcard(String),
    /// `www.example.*`: any name starting with `www.example.` (stored as `www.example.`).
    TrailingWildcard(String),
}

impl ServerName {
    /// Parse a `server_name` entry; `None` for an empty or malformed one.
    ///
    /// ```
    /// use proxy_core::router::ServerName;
    /// let n = ServerName::parse("*.Example.com").unwrap();
    /// assert!(n.matches("api.example.com"));
    /// assert!(!n.matches("example.com"));
    /// ```
    pub fn parse(name: &str) -> Option<ServerName> {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
            return None;
        }
        if let Some(rest) = name.strip_prefix('*') {
            return (rest.starts_with('.') && rest.len() > 1 && !rest.contains('*'))
                .then(|| ServerName::LeadingWildcard(rest.to_owned()));
        }
        if let Some(rest) = name.strip_suffix('*') {
            return (rest.ends_with('.') && rest.len() > 1 && !rest.contains('*'))
                .then(|| ServerName::TrailingWildcard(rest.to_owned()));
        }
        (!name.contains('*')).then_some(ServerName::Exact(name))
    }

    /// Whether `host` (lowercase, without port) is this name.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            ServerName::Exact(n) => n == host,
            ServerName::LeadingWildcard(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
            ServerName::TrailingWildcard(prefix) => {
                host.len() > prefix.len() && host.starts_with(prefix.as_str())
            }
        }
    }
}

/// The host part of a `Host` header value, lowercased and without the port; `None` when
/// the value is not a valid host (`[v6]`, name or IPv4, optional `:port`).
///
/// ```
/// use proxy_core::router::host_of;
/// assert_eq!(host_of("Example.COM:8080").as_deref(), Some("example.com"));
/// assert_eq!(host_of("[::1]:80").as_deref(), Some("[::1]"));
/// assert_eq!(host_of("a b"), None);
/// ```
pub fn host_of(value: &str) -> Option<String> {
    host_of_cow(value).map(Cow::into_owned)
}

/// [`host_of`] that borrows from `value` when the host is already lowercase without a
/// trailing dot (nearly always), so routing allocates nothing for it.
pub(crate) fn host_of_cow(value: &str) -> Option<Cow<'_, str>> {
    let (host, port) = if value.starts_with('[') {
        let end = value.find(']')?;
        let rest = &value[end + 1..];
        (&value[..=end], rest.strip_prefix(':'))
    } else {
        match value.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let valid = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        });
    if !valid {
        return None;
    }
    let h = host.strip_suffix('.').unwrap_or(host);
    Some(if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    })
}
