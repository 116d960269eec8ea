//! Turning a finished request into one log line: nginx's `combined`, `combined` with
//! timings, or a JSON object. Runs in the writer task, off the request path.

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Uri, Version};

use crate::access_log::UpstreamInfo;
use crate::router::Route;

/// The shape of each access log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// nginx's predefined `combined` format, byte for byte:
    /// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
    /// "$http_referer" "$http_user_agent"`.
    Combined,
    /// `combined` followed by the request time, the upstream address and the upstream
    /// response time: `... rt=0.012 uaddr="127.0.0.1:8000" urt="0.010"`. Any `combined`
    /// parser reads the leading part. The default.
    #[default]
    CombinedTimed,
    /// One JSON object per line (JSON lines), with the same facts plus the server and
    /// location that handled the request.
    Json,
}

/// Everything a line says about one request. Built on the request path from values
/// that are cheap to clone (no formatting there), formatted by the writer task.
#[derive(Debug)]
pub(crate) struct Record {
    /// When the response ended (nginx's `$time_local` is the time of logging).
    pub(crate) time: SystemTime,
    /// From receipt of the request to the end of the response.
    pub(crate) request_time: Duration,
    pub(crate) client: Option<IpAddr>,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: Version,
    pub(crate) referer: Option<HeaderValue>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) status: u16,
    /// Response body bytes handed to the connection.
    pub(crate) bytes: u64,
    pub(crate) upstream: Option<UpstreamInfo>,
    pub(crate) route: Option<Arc<Route>>,
}

impl Format {
    /// Append one line (with its `\n`) for `rec` to `out`.
    pub(crate) fn write(self, rec: &Record, out: &mut Vec<u8>) {
        match self {
            Format::Combined => combined(rec, out),
            Format::CombinedTimed => {
                combined(rec, out);
                timings(rec, out);
            }
            Format::Json => json(rec, out),
        }
        out.push(b'\n');
    }
}

// Writing into a `Vec<u8>` cannot fail, so the `io::Result`s of `write!` are ignored.

fn combined(rec: &Record, out: &mut Vec<u8>) {
    match rec.client {
        Some(ip) => {
            let _ = write!(out, "{ip}");
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" - - [");
    time_local(rec.time, out);
    out.extend_from_slice(b"] \"");
    escape_nginx(rec.method.as_str().as_bytes(), out);
    out.push(b' ');
    escape_nginx(request_target(&rec.uri).as_bytes(), out);
    let _ = write!(out, " {:?}\" {} {} \"", rec.version, rec.status, rec.bytes);
    header_nginx(rec.referer.as_ref(), out);
    out.extend_from_slice(b"\" \"");
    header_nginx(rec.user_agent.as_ref(), out);
    out.push(b'"');
}

fn timings(rec: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b" rt=");
    seconds(rec.request_time, out);
    match &rec.upstream {
        Some(up) => {
            let _ = write!(out, " uaddr=\"{}\" urt=\"", up.addr);
            seconds(up.duration, out);
            out.push(b'"');
        }
        None => out.extend_from_slice(b" uaddr=\"-\" urt=\"-\""),
    }
}

fn json(rec: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"time\":\"");
    time_iso8601(rec.time, out);
    out.extend_from_slice(b"\",\"remote_addr\":");
    match rec.client {
        Some(ip) => {
            let _ = write!(out, "\"{ip}\"");
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"method\":\"");
    escape_json(rec.method.as_str().as_bytes(), out);
    out.extend_from_slice(b"\",\"uri\":\"");
    escape_json(request_target(&rec.uri).as_bytes(), out);
    let _ = write!(
        out,
        "\",\"protocol\":\"{:?}\",\"status\":{},\"body_bytes_sent\":{},\"request_time\":",
        rec.version, rec.status, rec.bytes
    );
    seconds(rec.request_time, out);
    match &rec.upstream {
        Some(up) => {
            let _ = write!(
                out,
                ",\"upstream_addr\":\"{}\",\"upstream_response_time\":",
                up.addr
            );
            seconds(up.duration, out);
        }
        None => out.extend_from_slice(b",\"upstream_addr\":null,\"upstream_response_time\":null"),
    }
    out.extend_from_slice(b",\"http_referer\":");
    header_json(rec.referer.as_ref(), out);
    out.extend_from_slice(b",\"http_user_agent\":");
    header_json(rec.user_agent.as_ref(), out);
    match &rec.route {
        Some(route) => {
            out.extend_from_slice(b",\"server\":\"");
            escape_json(route.server.as_bytes(), out);
            out.extend_from_slice(b"\",\"location\":\"");
            escape_json(route.location.as_bytes(), out);
            out.extend_from_slice(b"\"}");
        }
        None => out.extend_from_slice(b",\"server\":null,\"location\":null}"),
    }
}

/// What nginx's `$request` shows as the target: the path and query of origin- and
/// absolute-form targets (HTTP/2 requests always carry a scheme and authority), the
/// authority of a CONNECT, `*` for `OPTIONS *`.
fn request_target(uri: &Uri) -> &str {
    match uri.path_and_query() {
        Some(pq) => pq.as_str(),
        None => uri.authority().map_or("-", |a| a.as_str()),
    }
}

/// Seconds with millisecond resolution, as nginx prints `$request_time`.
fn seconds(d: Duration, out: &mut Vec<u8>) {
    let _ = write!(out, "{}.{:03}", d.as_secs(), d.subsec_millis());
}

fn header_nginx(v: Option<&HeaderValue>, out: &mut Vec<u8>) {
    match v {
        Some(v) => escape_nginx(v.as_bytes(), out),
        None => out.push(b'-'),
    }
}

fn header_json(v: Option<&HeaderValue>, out: &mut Vec<u8>) {
    match v {
        Some(v) => {
            out.push(b'"');
            escape_json(v.as_bytes(), out);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// nginx's default log escaping: `"`, `\`, control bytes and bytes from 0x7f up become
/// `\xHH`, so a line can neither be split nor have its quoting broken by a header.
pub(crate) fn escape_nginx(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.push(b);
        }
    }
}

/// A JSON string body: `"` and `\` escaped, control characters as `\u00XX`, bytes
/// that are not UTF-8 replaced by U+FFFD (JSON text must be UTF-8).
pub(crate) fn escape_json(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..0x20 | 0x7f => out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
                _ => out.push(b),
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
}

/// A UTC civil date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

/// UTC date and time of `t` (times before 1970 are clamped to the epoch). Proleptic
/// Gregorian calendar from a day count, the classic era-based conversion: linear, no
/// tables, no allocation.
fn civil(t: SystemTime) -> Civil {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = (secs % 86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `10/Oct/2000:13:55:36 +0000`, nginx's `$time_local` (in UTC: the proxy does not read
/// the system time zone database).
fn time_local(t: SystemTime, out: &mut Vec<u8>) {
    let c = civil(t);
    let month = MONTHS
        .get(c.month.saturating_sub(1) as usize)
        .copied()
        .unwrap_or("Jan");
    let _ = write!(
        out,
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        c.day, month, c.year, c.hour, c.minute, c.second
    );
}

/// `2000-10-10T13:55:36.123Z`: RFC 3339 in UTC with milliseconds.
fn time_iso8601(t: SystemTime, out: &mut Vec<u8>) {
    let c = civil(t);
    let millis = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    let _ = write!(
        out,
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second, millis
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn record() -> Record {
        Record {
            time: UNIX_EPOCH + Duration::from_millis(971_186_136_123),
            request_time: Duration::from_millis(12),
            client: Some("203.0.113.7".parse().unwrap()),
            method: Method::GET,
            uri: "/a?b=1".parse().unwrap(),
            version: Version::HTTP_11,
            referer: Some(HeaderValue::from_static("http://r.example/")),
            user_agent: Some(HeaderValue::from_static("curl \"x\"\\")),
            status: 200,
            bytes: 1234,
            upstream: Some(UpstreamInfo::new(
                "127.0.0.1:8001".parse().unwrap(),
                Duration::from_millis(10),
            )),
            route: Some(Arc::new(Route {
                server: "api.example.com".into(),
                location: "/".into(),
            })),
        }
    }

    fn line(format: Format, rec: &Record) -> String {
        let mut out = Vec::new();
        format.write(rec, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn combined_is_nginx_combined() {
        assert_eq!(
            line(Format::Combined, &record()),
            "203.0.113.7 - - [10/Oct/2000:13:55:36 +0000] \"GET /a?b=1 HTTP/1.1\" 200 1234 \
             \"http://r.example/\" \"curl \\x22x\\x22\\x5C\"\n"
        );
    }

    #[test]
    fn timed_appends_timings() {
        let l = line(Format::CombinedTimed, &record());
        assert!(
            l.ends_with("\" rt=0.012 uaddr=\"127.0.0.1:8001\" urt=\"0.010\"\n"),
            "{l}"
        );
        let mut rec = record();
        rec.upstream = None;
        rec.client = None;
        rec.referer = None;
        let l = line(Format::CombinedTimed, &rec);
        assert!(l.starts_with("- - - ["), "{l}");
        assert!(l.contains("\"-\" \"curl"), "{l}");
        assert!(l.ends_with(" rt=0.012 uaddr=\"-\" urt=\"-\"\n"), "{l}");
    }

    #[test]
    fn json_is_one_object() {
        assert_eq!(
            line(Format::Json, &record()),
            "{\"time\":\"2000-10-10T13:55:36.123Z\",\"remote_addr\":\"203.0.113.7\",\
             \"method\":\"GET\",\"uri\":\"/a?b=1\",\"protocol\":\"HTTP/1.1\",\"status\":200,\
             \"body_bytes_sent\":1234,\"request_time\":0.012,\"upstream_addr\":\"127.0.0.1:8001\",\
             \"upstream_response_time\":0.010,\"http_referer\":\"http://r.example/\",\
             \"http_user_agent\":\"curl \\\"x\\\"\\\\\",\"server\":\"api.example.com\",\
             \"location\":\"/\"}\n"
        );
    }

    #[test]
    fn json_escapes_controls_and_bad_utf8() {
        let mut out = Vec::new();
        escape_json(b"a\x01\nb\xff\xfec\x7f", &mut out);
        assert_eq!(out, "a\\u0001\\nb\u{fffd}\u{fffd}c\\u007F".as_bytes());
    }

    #[test]
    fn targets() {
        assert_eq!(request_target(&"http://h/p?q".parse().unwrap()), "/p?q");
        assert_eq!(request_target(&"h:443".parse().unwrap()), "h:443");
        assert_eq!(request_target(&"*".parse().unwrap()), "*");
    }

    /// The inverse of `civil`'s day conversion, to check it against.
    fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(m);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[test]
    fn known_dates() {
        let at = |s: u64| civil(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(
            at(0),
            Civil {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0
            }
        );
        // 2000-02-29 (a leap day in a century year divisible by 400).
        assert_eq!((at(951_782_400).month, at(951_782_400).day), (2, 29));
        // 2100-03-01: 2100 is not a leap year.
        assert_eq!((at(4_107_542_400).month, at(4_107_542_400).day), (3, 1));
        assert_eq!(civil(UNIX_EPOCH - Duration::from_secs(5)).year, 1970);
    }

    proptest! {
        #[test]
        fn civil_round_trips(secs in 0u64..253_402_300_800) {
            let c = civil(UNIX_EPOCH + Duration::from_secs(secs));
            prop_assert!((1..=12).contains(&c.month) && (1..=31).contains(&c.day));
            let back = days_from_civil(c.year, c.month, c.day) * 86_400
                + i64::from(c.hour * 3600 + c.minute * 60 + c.second);
            prop_assert_eq!(back, secs as i64);
        }

        #[test]
        fn nginx_escape_keeps_lines_whole(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            escape_nginx(&bytes, &mut out);
            prop_assert!(out.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b'"'));
        }

        #[test]
        fn json_escape_is_a_valid_string(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = vec![b'"'];
            escape_json(&bytes, &mut out);
            out.push(b'"');
            let parsed: String = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(parsed, String::from_utf8_lossy(&bytes).into_owned());
        }
    }
}
