//! A strict RFC 9112 request parser: the judge of what the proxy *sends* upstream.
//!
//! Stricter than RFC 9112 lets a recipient be, on purpose: a proxy re-serialising a
//! request has no reason to emit obs-fold, bare LF, chunk extensions, duplicate framing
//! headers, leading zeros, a second Host or any transfer coding but a lone `chunked`.
//! Linear in its input, bounded in what it allocates, never panics.
//!
//! ```
//! use proxy_core::testing::strict::parse_request;
//! let (req, used) = parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap();
//! assert_eq!((req.method.as_str(), used), ("GET", 27));
//! assert!(parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n").is_err());
//! ```

/// Largest header block the strict parser accepts.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body the strict parser accepts.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// One request as the strict parser read it off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The method token.
    pub method: String,
    /// The request target, as sent.
    pub target: String,
    /// Header fields in order, names lowercased, values with OWS trimmed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The decoded body.
    pub body: Vec<u8>,
    /// Framed with `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl Parsed {
    /// Every value of header `name` (lowercase).
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The value of header `name` as text, if it appears exactly once.
    pub fn one(&self, name: &str) -> Option<String> {
        match self.all(name).as_slice() {
            [v] => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        }
    }
}

/// Why the strict parser refused the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, Violation> {
    Err(Violation(why.into()))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value byte: VCHAR, obs-text, SP or HTAB. No CR, LF or NUL.
fn is_field_byte(b: u8) -> bool {
    b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Finds the next CRLF-terminated line starting at `at`; a bare LF or bare CR is a
/// violation. Returns the line (without CRLF) and the index after it.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, Violation> {
    let rest = buf.get(at..).unwrap_or_default();
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'\n' => return bad("bare LF"),
            b'\r' => {
                return match rest.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((&rest[..i], at + i + 2))),
                    Some(_) => bad("bare CR"),
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Parse one request from the start of `buf` with RFC 9112 rules applied strictly.
/// `Ok(None)`: more bytes are needed. `Ok(Some((req, used)))`: one request and the
/// number of bytes it took.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Parsed, usize)>, Violation> {
    let Some((request_line, mut at)) = line(buf, 0)? else {
        if buf.len() > MAX_HEAD {
            return bad("request line too long");
        }
        return Ok(None);
    };
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad(format!(
            "request line is not three fields separated by single spaces: {:?}",
            String::from_utf8_lossy(request_line)
        ));
    };
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        return bad("method is not a token");
    }
    if version != b"HTTP/1.1" {
        return bad(format!(
            "version is not HTTP/1.1: {:?}",
            String::from_utf8_lossy(version)
        ));
    }
    // A proxy talks to its upstream in origin-form (or `*` for OPTIONS).
    let origin_form = target.first() == Some(&b'/');
    let asterisk = target == b"*" && method == b"OPTIONS";
    if !(origin_form || asterisk) {
        return bad("target is not in origin-form");
    }
    if !target.iter().all(|b| (0x21..=0x7e).contains(b)) || target.contains(&b'#') {
        return bad("target has bytes outside VCHAR or a fragment");
    }
    let mut headers = Vec::new();
    loop {
        let Some((field, next)) = line(buf, at)? else {
            if buf.len() > MAX_HEAD {
                return bad("header block too long");
            }
            return Ok(None);
        };
        at = next;
        if field.is_empty() {
            break;
        }
        if field[0] == b' ' || field[0] == b'\t' {
            return bad("obs-fold");
        }
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return bad("field line without a colon");
        };
        let (name, value) = (&field[..colon], &field[colon + 1..]);
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return bad(format!(
                "field name is not a token: {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        if !value.iter().copied().all(is_field_byte) {
            return bad("control byte in a field value");
        }
        let value = trim_ows(value);
        headers.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            value.to_vec(),
        ));
        if headers.len() > 200 {
            return bad("too many fields");
        }
    }
    let mut req = Parsed {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        headers,
        body: Vec::new(),
        chunked: false,
    };
    if req.all("host").len() != 1 {
        return bad("an HTTP/1.1 request needs exactly one Host");
    }
    let te = req.all("transfer-encoding");
    let cl = req.all("content-length");
    if !te.is_empty() && !cl.is_empty() {
        return bad("both Transfer-Encoding and Content-Length");
    }
    if cl.len() > 1 {
        return bad("Content-Length repeated");
    }
    if te.len() > 1 || te.first().is_some_and(|v| *v != b"chunked") {
        return bad("Transfer-Encoding other than one plain `chunked`");
    }
    if !te.is_empty() {
        req.chunked = true;
        let Some((body, used)) = parse_chunked(buf, at)? else {
            return Ok(None);
        };
        req.body = body;
        return Ok(Some((req, used)));
    }
    let len = match cl.first() {
        None => 0,
        Some(v) => parse_content_length(v)?,
    };
    let end = at as u64 + len;
    if (buf.len() as u64) < end {
        return Ok(None);
    }
    let end = end as usize;
    req.body = buf[at..end].to_vec();
    Ok(Some((req, end)))
}

/// `Content-Length`: 1*DIGIT, no sign, no leading zero unless it is `0`, bounded.
fn parse_content_length(v: &[u8]) -> Result<u64, Violation> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return bad(format!(
            "Content-Length is not 1*DIGIT: {:?}",
            String::from_utf8_lossy(v)
        ));
    }
    if v.len() > 1 && v[0] == b'0' {
        return bad("Content-Length with a leading zero");
    }
    if v.len() > 15 {
        return bad("Content-Length too large");
    }
    let n = v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    if n > MAX_BODY {
        return bad("Content-Length too large");
    }
    Ok(n)
}

/// A chunked body starting at `at`: the decoded data and the index after the trailer
/// section; `Ok(None)` if incomplete. Hex sizes without leading zeros (except `0`),
/// no extensions, CRLF after each chunk, then trailer fields and the final CRLF.
pub fn parse_chunked(buf: &[u8], mut at: usize) -> Result<Option<(Vec<u8>, usize)>, Violation> {
    let mut body = Vec::new();
    loop {
        let Some((size_line, next)) = line(buf, at)? else {
            return Ok(None);
        };
        if size_line.is_empty() || size_line.len() > 15 {
            return bad("chunk size line empty or too long");
        }
        if !size_line.iter().all(u8::is_ascii_hexdigit) {
            return bad(format!(
                "chunk size line is not bare hex (extension, space or sign): {:?}",
                String::from_utf8_lossy(size_line)
            ));
        }
        if size_line.len() > 1 && size_line[0] == b'0' {
            return bad("chunk size with a leading zero");
        }
        let size = size_line.iter().fold(0u64, |n, &d| {
            n * 16 + u64::from(char::from(d).to_digit(16).unwrap_or(0))
        });
        if body.len() as u64 + size > MAX_BODY {
            return bad("chunked body too large");
        }
        at = next;
        if size == 0 {
            break;
        }
        let end = at + size as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..end]);
        if &buf[end..end + 2] != b"\r\n" {
            return bad("chunk data not followed by CRLF");
        }
        at = end + 2;
    }
    // Trailer section.
    loop {
        let Some((field, next)) = line(buf, at)? else {
            return Ok(None);
        };
        at = next;
        if field.is_empty() {
            return Ok(Some((body, at)));
        }
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return bad("trailer line without a colon");
        };
        let name = String::from_utf8_lossy(&field[..colon]).to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "host" | "trailer"
        ) {
            return bad(format!("framing field {name} in a trailer"));
        }
    }
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}
