//! Access logs over real sockets: `combined` and JSON lines as written for proxied
//! requests, reopen after rotation, 499 for clients that go away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::StreamBody;
use proxy_core::access_log::{AccessLogLayer, AccessLogWriter, Format, Target, UpstreamInfo};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{ProxyBody, Request, Response};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Layer, ServiceExt};

/// Forward to `up`, putting an [`UpstreamInfo`] in the response as the forwarding code
/// is to do.
fn forward(
    up: &Upstream,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    let addr = up.addr;
    let fwd = Forward::new(UpstreamClient::new(ClientConfig::default()), addr);
    tower::service_fn(move |req: Request| {
        let fwd = fwd.clone();
        async move {
            let start = Instant::now();
            let mut resp = fwd.oneshot(req).await?;
            resp.extensions_mut()
                .insert(UpstreamInfo::new(addr, start.elapsed()));
            Ok::<_, Infallible>(resp)
        }
    })
}

fn writer(path: &Path, format: Format) -> AccessLogWriter {
    AccessLogWriter::builder(Target::File(path.to_owned()))
        .format(format)
        .spawn()
        .unwrap()
}

fn request(path: &str) -> http::Request<ProxyBody> {
    http::Request::builder()
        .uri(path)
        .header("host", "example.test")
        .header("referer", "http://ref.example/page")
        .header("user-agent", "test \"agent\"/1.0")
        .body(ProxyBody::empty())
        .unwrap()
}

/// Flush and read the log until it has `n` lines, failing after the deadline.
async fn read_lines(writer: &AccessLogWriter, path: &Path, n: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        writer.flush().await.unwrap();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "log has {lines:?}, want {n} lines"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// nginx's `combined`, then the timing fields of [`Format::CombinedTimed`].
const COMBINED: &str = r#"^(\S+) - (\S+) \[(\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "(\S+) (\S+) (HTTP/[0-9.]+)" (\d{3}) (\d+) "((?:[^"\\]|\\x[0-9A-F]{2})*)" "((?:[^"\\]|\\x[0-9A-F]{2})*)""#;
const TIMINGS: &str = r#" rt=(\d+\.\d{3}) uaddr="([^"]*)" urt="([^"]*)"$"#;

#[tokio::test]
async fn combined_lines_parse() {
    let up = Upstream::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = writer(&path, Format::CombinedTimed);
    let proxy = Proxy::start(AccessLogLayer::new(log.clone()).layer(forward(&up))).await;
    let (parts, _) = send(proxy.addr, request("/a/b?c=d")).await;
    assert_eq!(parts.status, 200);
    let (_, _) = send(proxy.addr, request("/second")).await;

    let re = regex::Regex::new(&format!("{COMBINED}{TIMINGS}")).unwrap();
    let lines = read_lines(&log, &path, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let c = re
        .captures(&lines[0])
        .unwrap_or_else(|| panic!("not combined: {}", lines[0]));
    assert_eq!(&c[1], "127.0.0.1");
    assert_eq!(&c[2], "-");
    assert_eq!(&c[4], "GET");
    assert_eq!(&c[5], "/a/b?c=d");
    assert_eq!(&c[6], "HTTP/1.1");
    assert_eq!(&c[7], "200");
    assert_eq!(&c[8], "2", "body bytes of \"ok\"");
    assert_eq!(&c[9], "http://ref.example/page");
    assert_eq!(&c[10], r"test \x22agent\x22/1.0");
    assert!(c[11].parse::<f64>().unwrap() < 10.0);
    assert_eq!(c[12], up.addr.to_string());
    assert!(c[13].parse::<f64>().unwrap() < 10.0);
    assert!(re.captures(&lines[1]).unwrap()[5].eq("/second"));

    // Plain `combined` is exactly the nginx format: the same pattern, anchored.
    let path2 = dir.path().join("plain.log");
    let log2 = writer(&path2, Format::Combined);
    let proxy2 = Proxy::start(AccessLogLayer::new(log2.clone()).layer(forward(&up))).await;
    send(proxy2.addr, request("/p")).await;
    let strict = regex::Regex::new(&format!("{COMBINED}$")).unwrap();
    let l = read_lines(&log2, &path2, 1).await;
    assert!(strict.is_match(&l[0]), "{}", l[0]);
}

#[tokio::test]
async fn json_lines_parse() {
    let up = Upstream::start(|_| async {
        let mut r = http::Response::new(full("not here"));
        *r.status_mut() = http::StatusCode::NOT_FOUND;
        r
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.json");
    let log = writer(&path, Format::Json);
    let proxy = Proxy::start(AccessLogLayer::new(log.clone()).layer(forward(&up))).await;
    for p in ["/one", "/two?x=%22y%22"] {
        send(proxy.addr, request(p)).await;
    }
    let lines = read_lines(&log, &path, 2).await;
    for (line, uri) in lines.iter().zip(["/one", "/two?x=%22y%22"]) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["remote_addr"], "127.0.0.1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["uri"], uri);
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 404);
        assert_eq!(v["body_bytes_sent"], 8);
        assert_eq!(v["upstream_addr"], up.addr.to_string());
        assert!(v["request_time"].as_f64().unwrap() >= 0.0);
        assert!(v["upstream_response_time"].as_f64().unwrap() >= 0.0);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["http_user_agent"], "test \"agent\"/1.0");
    }
}

#[tokio::test]
async fn reopen_after_rename_writes_a_new_file() {
    let up = Upstream::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let log = writer(&path, Format::Combined);
    let proxy = Proxy::start(AccessLogLayer::new(log.clone()).layer(forward(&up))).await;

    send(proxy.addr, request("/before")).await;
    read_lines(&log, &path, 1).await;
    std::fs::rename(&path, &rotated).unwrap();
    // Without a reopen, lines would keep going to the renamed file.
    log.reopen().await.unwrap();
    send(proxy.addr, request("/after")).await;

    let new = read_lines(&log, &path, 1).await;
    assert_eq!(new.len(), 1);
    assert!(new[0].contains("\"GET /after HTTP/1.1\""), "{new:?}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(old.lines().count(), 1);
    assert!(old.contains("\"GET /before HTTP/1.1\""), "{old}");
}

/// An upstream that sends one chunk of its body and then nothing more.
async fn stalling_upstream() -> Upstream {
    Upstream::start(|_| async {
        let first = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
            Bytes::from_static(b"first"),
        ))]);
        let stream = first.chain(futures_util::stream::pending());
        http::Response::new(ProxyBody::boxed(StreamBody::new(stream)))
    })
    .await
}

#[tokio::test]
async fn client_gone_mid_body_is_499() {
    let up = stalling_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = writer(&path, Format::Combined);
    let proxy = Proxy::start(AccessLogLayer::new(log.clone()).layer(forward(&up))).await;

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(5).any(|w| w == b"first") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);

    let l = read_lines(&log, &path, 1).await;
    assert!(l[0].contains("\"GET /stall HTTP/1.1\" 499 5 "), "{l:?}");
}

#[tokio::test]
async fn client_gone_before_the_response_is_499() {
    let up = Upstream::start(|_| std::future::pending()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = writer(&path, Format::Combined);
    let proxy = Proxy::start(AccessLogLayer::new(log.clone()).layer(forward(&up))).await;

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /wait HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .await
        .unwrap();
    wait_for(|| !up.seen().is_empty()).await;
    drop(s);

    let l = read_lines(&log, &path, 1).await;
    assert!(l[0].contains("\"GET /wait HTTP/1.1\" 499 0 "), "{l:?}");
}
