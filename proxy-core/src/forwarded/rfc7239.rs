//! The RFC 7239 `Forwarded` header: a list of elements of `for=`, `by=`, `host=`,
//! `proto=` pairs, values as tokens or quoted strings with `\` escapes.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::xff::parse_port;

/// One `Forwarded` element: what one proxy saw of the request it received.
/// Extension parameters are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element<'a> {
    /// `for=`: the node that sent the request to the proxy that wrote this element.
    pub for_: Option<Node<'a>>,
    /// `by=`: the proxy's own interface the request came in on.
    pub by: Option<Node<'a>>,
    /// `host=`: the `Host` that proxy received (unvalidated: see [`parse_host`](super::parse_host)).
    pub host: Option<Cow<'a, str>>,
    /// `proto=`: the scheme that proxy received the request with (unvalidated).
    pub proto: Option<Cow<'a, str>>,
}

/// A node identifier (`for=` / `by=` value): a name and an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node<'a> {
    /// The address, `unknown`, or an obfuscated identifier.
    pub name: NodeName<'a>,
    /// The port, if one was given.
    pub port: Option<NodePort<'a>>,
}

/// The name part of a [`Node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeName<'a> {
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// `unknown`: the proxy did not know, or would not say.
    Unknown,
    /// An obfuscated identifier such as `_hidden` (leading `_` included).
    Obfuscated(Cow<'a, str>),
}

/// The port part of a [`Node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePort<'a> {
    /// A port number.
    Port(u16),
    /// An obfuscated port such as `_p1` (leading `_` included).
    Obfuscated(Cow<'a, str>),
}

/// A `Forwarded` value that does not follow the RFC 7239 grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed Forwarded header")
    }
}

impl std::error::Error for Malformed {}

/// The elements of one `Forwarded` header value, left to right. After a syntax error
/// the iterator yields one `Err(Malformed)` and stops: a list whose commas cannot be
/// trusted cannot be walked from either end. Empty list elements are skipped; a
/// parameter given twice in one element is an error. Linear; allocates only to
/// unescape a quoted string that holds a `\`.
///
/// ```
/// use proxy_core::forwarded::{parse_forwarded, NodeName, NodePort};
/// let mut it = parse_forwarded(r#"for=192.0.2.43, for="[2001:db8:cafe::17]:4711";proto=https"#);
/// let first = it.next().unwrap().unwrap();
/// assert_eq!(first.for_.unwrap().name, NodeName::Ip("192.0.2.43".parse().unwrap()));
/// let second = it.next().unwrap().unwrap();
/// let node = second.for_.unwrap();
/// assert_eq!(node.name, NodeName::Ip("2001:db8:cafe::17".parse().unwrap()));
/// assert_eq!(node.port, Some(NodePort::Port(4711)));
/// assert_eq!(second.proto.as_deref(), Some("https"));
/// assert!(it.next().is_none());
/// assert!(parse_forwarded("for=[::1]").next().unwrap().is_err());
/// ```
pub fn parse_forwarded(value: &str) -> Elements<'_> {
    Elements {
        s: value,
        pos: 0,
        done: false,
    }
}

/// The iterator [`parse_forwarded`] returns.
#[derive(Debug, Clone)]
pub struct Elements<'a> {
    s: &'a str,
    pos: usize,
    done: bool,
}

impl<'a> Iterator for Elements<'a> {
    type Item = Result<Element<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let b = self.s.as_bytes();
        loop {
            self.skip_ows();
            match b.get(self.pos) {
                None => {
                    self.done = true;
                    return None;
                }
                Some(b',') => self.pos += 1,
                Some(_) => break,
            }
        }
        let item = self.element();
        if item.is_err() {
            self.done = true;
        }
        Some(item)
    }
}

impl<'a> Elements<'a> {
    fn skip_ows(&mut self) {
        let b = self.s.as_bytes();
        while matches!(b.get(self.pos), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// One element, up to and including the `,` that ends it.
    fn element(&mut self) -> Result<Element<'a>, Malformed> {
        let b = self.s.as_bytes();
        let mut el = Element::default();
        loop {
            // Parameters allow OWS around `;` (RFC 9110 §5.6.6).
            self.skip_ows();
            match b.get(self.pos) {
                None => return Ok(el),
                Some(b',') => {
                    self.pos += 1;
                    return Ok(el);
                }
                Some(b';') => {
                    self.pos += 1;
                    continue;
                }
                Some(_) => {}
            }
            let name = self.token().ok_or(Malformed)?;
            if b.get(self.pos) != Some(&b'=') {
                return Err(Malformed);
            }
            self.pos += 1;
            let value = if b.get(self.pos) == Some(&b'"') {
                self.quoted()?
            } else {
                Cow::Borrowed(self.token().ok_or(Malformed)?)
            };
            let slot_taken = if name.eq_ignore_ascii_case("for") {
                set_once(&mut el.for_, parse_node_cow(value).ok_or(Malformed)?)
            } else if name.eq_ignore_ascii_case("by") {
                set_once(&mut el.by, parse_node_cow(value).ok_or(Malformed)?)
            } else if name.eq_ignore_ascii_case("host") {
                set_once(&mut el.host, value)
            } else if name.eq_ignore_ascii_case("proto") {
                set_once(&mut el.proto, value)
            } else {
                false
            };
            if slot_taken {
                return Err(Malformed);
            }
            self.skip_ows();
            if !matches!(b.get(self.pos), None | Some(b';' | b',')) {
                return Err(Malformed);
            }
        }
    }

    fn token(&mut self) -> Option<&'a str> {
        let start = self.pos;
        let b = self.s.as_bytes();
        while b.get(self.pos).is_some_and(|&c| is_tchar(c)) {
            self.pos += 1;
        }
        (self.pos > start).then(|| &self.s[start..self.pos])
    }

    /// A quoted string starting at the opening `"`; unescaped.
    fn quoted(&mut self) -> Result<Cow<'a, str>, Malformed> {
        let b = self.s.as_bytes();
        self.pos += 1;
        let start = self.pos;
        let mut escaped = false;
        loop {
            let c = *b.get(self.pos).ok_or(Malformed)?;
            match c {
                b'"' => break,
                b'\\' => {
                    let next = *b.get(self.pos + 1).ok_or(Malformed)?;
                    if !(next == b'\t' || next == b' ' || next >= 0x21 && next != 0x7f) {
                        return Err(Malformed);
                    }
                    escaped = true;
                    self.pos += 2;
                }
                b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => self.pos += 1,
                _ => return Err(Malformed),
            }
        }
        let raw = &self.s[start..self.pos];
        self.pos += 1;
        if !escaped {
            return Ok(Cow::Borrowed(raw));
        }
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        Ok(Cow::Owned(out))
    }
}

/// Store `value` in an empty slot; `true` if the slot was already taken.
fn set_once<T>(slot: &mut Option<T>, value: T) -> bool {
    let taken = slot.is_some();
    if !taken {
        *slot = Some(value);
    }
    taken
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn parse_node_cow(value: Cow<'_, str>) -> Option<Node<'_>> {
    match value {
        Cow::Borrowed(s) => parse_node(s),
        Cow::Owned(s) => parse_node(&s).map(Node::into_owned),
    }
}

/// A node identifier (RFC 7239 §6): `IPv4[:port]`, `[IPv6][:port]`, `unknown[:port]`,
/// `_obfuscated[:port]`, where a port is digits or `_obfuscated`.
///
/// ```
/// use proxy_core::forwarded::{parse_node, NodeName, NodePort};
/// let node = parse_node("_hidden:_p1").unwrap();
/// assert_eq!(node.name, NodeName::Obfuscated("_hidden".into()));
/// assert_eq!(node.port, Some(NodePort::Obfuscated("_p1".into())));
/// assert!(parse_node("::1").is_none());
/// ```
pub fn parse_node(s: &str) -> Option<Node<'_>> {
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let name = NodeName::Ip(IpAddr::V6(ip.parse::<Ipv6Addr>().ok()?));
        match after {
            "" => (name, None),
            _ => (name, Some(after.strip_prefix(':')?)),
        }
    } else {
        let (name, port) = match s.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        let name = if name.eq_ignore_ascii_case("unknown") {
            NodeName::Unknown
        } else if is_obfuscated(name) {
            NodeName::Obfuscated(Cow::Borrowed(name))
        } else {
            NodeName::Ip(IpAddr::V4(name.parse::<Ipv4Addr>().ok()?))
        };
        (name, port)
    };
    let port = match port {
        None => None,
        Some(p) if is_obfuscated(p) => Some(NodePort::Obfuscated(Cow::Borrowed(p))),
        Some(p) => Some(NodePort::Port(parse_port(p)?)),
    };
    Some(Node { name, port })
}

fn is_obfuscated(s: &str) -> bool {
    s.len() > 1
        && s.starts_with('_')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

impl Node<'_> {
    /// This node with owned strings.
    pub fn into_owned(self) -> Node<'static> {
        Node {
            name: match self.name {
                NodeName::Ip(ip) => NodeName::Ip(ip),
                NodeName::Unknown => NodeName::Unknown,
                NodeName::Obfuscated(s) => NodeName::Obfuscated(Cow::Owned(s.into_owned())),
            },
            port: self.port.map(|p| match p {
                NodePort::Port(p) => NodePort::Port(p),
                NodePort::Obfuscated(s) => NodePort::Obfuscated(Cow::Owned(s.into_owned())),
            }),
        }
    }

    /// The address of this node, if it names one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.name {
            NodeName::Ip(ip) => Some(ip),
            _ => None,
        }
    }

    /// The port number of this node, if it names one.
    pub fn port_number(&self) -> Option<u16> {
        match self.port {
            Some(NodePort::Port(p)) => Some(p),
            _ => None,
        }
    }
}

impl From<SocketAddr> for Node<'static> {
    fn from(addr: SocketAddr) -> Self {
        Node {
            name: NodeName::Ip(addr.ip()),
            port: Some(NodePort::Port(addr.port())),
        }
    }
}

impl From<IpAddr> for Node<'static> {
    fn from(ip: IpAddr) -> Self {
        Node {
            name: NodeName::Ip(ip),
            port: None,
        }
    }
}

/// The node as it is written inside a value, before quoting: `192.0.2.1:80`,
/// `[2001:db8::1]:4711`, `unknown`, `_hidden`.
impl fmt::Display for Node<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            NodeName::Ip(IpAddr::V4(ip)) => write!(f, "{ip}")?,
            NodeName::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
            NodeName::Unknown => f.write_str("unknown")?,
            NodeName::Obfuscated(s) => f.write_str(s)?,
        }
        match &self.port {
            None => Ok(()),
            Some(NodePort::Port(p)) => write!(f, ":{p}"),
            Some(NodePort::Obfuscated(s)) => write!(f, ":{s}"),
        }
    }
}

/// The element as a `Forwarded` list member: `for=…;by=…;host=…;proto=…`, values
/// quoted where the grammar requires (IPv6, ports, anything not a token).
///
/// ```
/// use proxy_core::forwarded::{Element, Node};
/// let el = Element {
///     for_: Some(Node::from("[2001:db8::1]:4711".parse::<std::net::SocketAddr>().unwrap())),
///     proto: Some("https".into()),
///     ..Element::default()
/// };
/// assert_eq!(el.to_string(), r#"for="[2001:db8::1]:4711";proto=https"#);
/// ```
impl fmt::Display for Element<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        let mut pair = |f: &mut fmt::Formatter<'_>, name: &str, value: &dyn fmt::Display| {
            let r = write!(f, "{sep}{name}=");
            sep = ";";
            r.and_then(|()| write_value(f, value))
        };
        if let Some(n) = &self.for_ {
            pair(f, "for", n)?;
        }
        if let Some(n) = &self.by {
            pair(f, "by", n)?;
        }
        if let Some(h) = &self.host {
            pair(f, "host", h)?;
        }
        if let Some(p) = &self.proto {
            pair(f, "proto", p)?;
        }
        Ok(())
    }
}

/// Write `value` as a token if it is one, else as a quoted string with `"` and `\`
/// escaped. Formats into a small stack buffer first; longer values are written
/// quoted character by character.
fn write_value(f: &mut fmt::Formatter<'_>, value: &dyn fmt::Display) -> fmt::Result {
    let mut buf = StackStr::default();
    let text: Cow<'_, str> = if fmt::write(&mut buf, format_args!("{value}")).is_ok() {
        Cow::Borrowed(buf.as_str())
    } else {
        Cow::Owned(value.to_string())
    };
    if !text.is_empty() && text.bytes().all(is_tchar) {
        return f.write_str(&text);
    }
    f.write_str("\"")?;
    for c in text.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

/// A fixed buffer that fails when full (so node formatting needs no heap).
struct StackStr {
    buf: [u8; 128],
    len: usize,
}

impl Default for StackStr {
    fn default() -> Self {
        StackStr {
            buf: [0; 128],
            len: 0,
        }
    }
}

impl StackStr {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever copied in, so this cannot fail.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap.
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(s: &str) -> Result<Vec<Element<'_>>, Malformed> {
        parse_forwarded(s).collect()
    }

    #[test]
    fn rfc_examples() {
        let els = all(r#"for="_gazonk""#).unwrap();
        assert_eq!(
            els[0].for_.as_ref().unwrap().name,
            NodeName::Obfuscated("_gazonk".into())
        );
        let els = all(r#"For="[2001:db8:cafe::17]:4711""#).unwrap();
        assert_eq!(els[0].for_.as_ref().unwrap().port_number(), Some(4711));
        let els = all("for=192.0.2.60;proto=http;by=203.0.113.43").unwrap();
        assert_eq!(
            els[0].by.as_ref().unwrap().ip(),
            Some("203.0.113.43".parse().unwrap())
        );
        assert_eq!(els[0].proto.as_deref(), Some("http"));
        let els = all("for=192.0.2.43, for=198.51.100.17").unwrap();
        assert_eq!(els.len(), 2);
        let els = all(r#"for=192.0.2.43,for="[2001:db8:cafe::17]",for=unknown"#).unwrap();
        assert_eq!(els[2].for_.as_ref().unwrap().name, NodeName::Unknown);
    }

    #[test]
    fn escapes_and_extensions() {
        let els = all(r#"host="ex\"am\\ple";ext="a,b;c";for=unknown"#).unwrap();
        assert_eq!(els.len(), 1);
        assert_eq!(els[0].host.as_deref(), Some(r#"ex"am\ple"#));
        let els = all(r#"for="\_h\i\d""#).unwrap();
        assert_eq!(
            els[0].for_.as_ref().unwrap().name,
            NodeName::Obfuscated("_hid".into())
        );
    }

    #[test]
    fn empty_elements_and_ows() {
        let els = all(" , for=1.2.3.4 ; proto=https ,, ;, for=unknown ,").unwrap();
        assert_eq!(els.len(), 3);
        assert_eq!(els[1], Element::default());
        assert_eq!(all("").unwrap(), []);
    }

    #[test]
    fn malformed() {
        for bad in [
            "for",
            "for=",
            "for==1",
            "for=1.2.3.4 x",
            "for=\"1.2.3.4",
            "for=[::1]",
            "for=\"::1\"",
            "for=1.2.3.4:99999",
            "for=a.b",
            "for=1.2.3.4;for=unknown",
            "proto=http;PROTO=https",
            "=x",
            "for=\"\\",
            "for=\"a\u{1}\"",
            "for = x",
            "for=\"_x:\"",
            "by=\"[::1]x\"",
            "host=\"a\x7f\"",
        ] {
            assert_eq!(all(bad), Err(Malformed), "{bad:?}");
        }
        // An error ends the walk: nothing after it is yielded.
        let mut it = parse_forwarded("for=1.2.3.4, for=@, for=5.6.7.8");
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }

    fn any_node() -> impl Strategy<Value = Node<'static>> {
        let name = prop_oneof![
            any::<[u8; 4]>().prop_map(|a| NodeName::Ip(IpAddr::from(a))),
            any::<[u8; 16]>().prop_map(|a| NodeName::Ip(IpAddr::from(a))),
            Just(NodeName::Unknown),
            "_[a-zA-Z0-9._-]{1,12}".prop_map(|s| NodeName::Obfuscated(s.into())),
        ];
        let port = proptest::option::of(prop_oneof![
            any::<u16>().prop_map(NodePort::Port),
            "_[a-zA-Z0-9._-]{1,8}".prop_map(|s| NodePort::Obfuscated(s.into())),
        ]);
        (name, port).prop_map(|(name, port)| Node { name, port })
    }

    fn any_element() -> impl Strategy<Value = Element<'static>> {
        (
            proptest::option::of(any_node()),
            proptest::option::of(any_node()),
            proptest::option::of("[ -~]{0,20}".prop_map(Cow::Owned)),
            proptest::option::of("[ -~]{0,10}".prop_map(Cow::Owned)),
        )
            .prop_map(|(for_, by, host, proto)| Element {
                for_,
                by,
                host,
                proto,
            })
    }

    proptest! {
        #[test]
        fn round_trip(els in proptest::collection::vec(any_element(), 1..6)) {
            // An element with no pair formats as nothing: an empty list member, skipped.
            let els: Vec<_> = els.into_iter().filter(|e| *e != Element::default()).collect();
            let text = els.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ");
            prop_assert_eq!(all(&text), Ok(els));
        }

        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            for _ in parse_forwarded(&s) {}
        }

        #[test]
        fn never_panics_on_forwarded_alphabet(s in "[a-z=;,\" \\\\\\[\\]:_0-9.]{0,200}") {
            for _ in parse_forwarded(&s) {}
        }
    }
}
