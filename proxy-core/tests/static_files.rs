//! StaticFiles over real sockets: a hyper HTTP/1.1 server on 127.0.0.1 serving the
//! service, real files in a temp dir, a hyper client and a raw TCP client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proxy_core::body::ProxyBody;
use proxy_core::static_files::{SkipAccessLog, StaticFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

mod support;
use support::serve;

/// One request on a fresh connection; the whole body collected.
async fn send(
    addr: SocketAddr,
    req: http::Request<Empty<Bytes>>,
) -> (http::response::Parts, Bytes) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

fn get(path: &str) -> http::request::Builder {
    http::Request::get(path).header("host", "test")
}

/// Writes `request` on a raw socket and reads until the server closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

struct Site {
    _outside: tempfile::TempDir,
    root: tempfile::TempDir,
}

/// DIR/static/{app.css, app.css.gz, app.css.br, data.bin, sub/index.html, sub/home.htm,
/// link-in -> app.css, link-out -> OUTSIDE/secret.txt}, DIR/secret.txt, OUTSIDE/secret.txt
fn site() -> Site {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "OUTSIDE-SECRET").unwrap();
    let root = tempfile::tempdir().unwrap();
    let st = root.path().join("static");
    std::fs::create_dir_all(st.join("sub")).unwrap();
    std::fs::write(root.path().join("secret.txt"), "ROOT-SECRET").unwrap();
    std::fs::write(st.join("app.css"), "body { color: red }").unwrap();
    std::fs::write(st.join("app.css.gz"), "GZIP-BYTES").unwrap();
    std::fs::write(st.join("app.css.br"), "BROTLI-BYTES").unwrap();
    std::fs::write(st.join("data.bin"), (0u8..=255).collect::<Vec<_>>()).unwrap();
    std::fs::write(st.join("sub/index.html"), "<h1>index</h1>").unwrap();
    std::fs::write(st.join("sub/home.htm"), "<h1>home</h1>").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(st.join("app.css"), st.join("link-in")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.txt"), st.join("link-out")).unwrap();
    }
    Site {
        _outside: outside,
        root,
    }
}

#[tokio::test]
async fn get_head_conditional_and_headers() {
    let site = site();
    let files = StaticFiles::alias("/static/", site.root.path().join("static"))
        .expires(Duration::from_secs(30 * 86400))
        .cache_control(HeaderValue::from_static("public, immutable"))
        .build()
        .unwrap();
    let addr = serve(files).await;

    let (p, body) = send(addr, get("/static/app.css").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(&body[..], b"body { color: red }");
    assert_eq!(p.headers["content-type"], "text/css");
    assert_eq!(p.headers["content-length"], "19");
    assert_eq!(p.headers["accept-ranges"], "bytes");
    assert_eq!(
        p.headers["cache-control"],
        "max-age=2592000, public, immutable"
    );
    let expires = httpdate::parse_http_date(p.headers["expires"].to_str().unwrap()).unwrap();
    let ahead = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(ahead > Duration::from_secs(30 * 86400 - 60), "{ahead:?}");
    let etag = p.headers["etag"].clone();
    let last_modified = p.headers["last-modified"].clone();
    assert!(etag.to_str().unwrap().starts_with('"'));

    // HEAD: same headers, no body.
    let req = http::Request::head("/static/app.css")
        .header("host", "t")
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(p.headers["content-length"], "19");
    assert_eq!(p.headers["etag"], etag);

    // If-None-Match → 304 with the validators and caching headers, no body.
    let req = get("/static/app.css")
        .header("if-none-match", etag.clone())
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert_eq!(p.status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(p.headers["etag"], etag);
    assert_eq!(
        p.headers["cache-control"],
        "max-age=2592000, public, immutable"
    );

    // A different ETag → 200.
    let req = get("/static/app.css")
        .header("if-none-match", "\"other\"")
        .body(Empty::new())
        .unwrap();
    assert_eq!(send(addr, req).await.0.status, StatusCode::OK);

    // If-Modified-Since equal to Last-Modified → 304; a date far in the past → 200.
    let req = get("/static/app.css")
        .header("if-modified-since", last_modified)
        .body(Empty::new())
        .unwrap();
    assert_eq!(send(addr, req).await.0.status, StatusCode::NOT_MODIFIED);
    let req = get("/static/app.css")
        .header("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
        .body(Empty::new())
        .unwrap();
    assert_eq!(send(addr, req).await.0.status, StatusCode::OK);

    // Not GET/HEAD → 405 with Allow.
    let req = http::Request::post("/static/app.css")
        .header("host", "t")
        .body(Empty::new())
        .unwrap();
    let (p, _) = send(addr, req).await;
    assert_eq!(p.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(p.headers.contains_key("allow"));

    // Missing file → 404 with a short body; a file path used as a directory → 404.
    let (p, body) = send(addr, get("/static/nope.css").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    assert_eq!(&body[..], b"404 Not Found\n");
    let (p, _) = send(addr, get("/static/app.css/x").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    // Outside the alias prefix → 404.
    let (p, _) = send(addr, get("/other/app.css").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn single_ranges_and_unsatisfiable() {
    let site = site();
    let files = StaticFiles::root(site.root.path()).build().unwrap();
    let addr = serve(files).await;

    let req = get("/static/data.bin")
        .header("range", "bytes=10-19")
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert_eq!(p.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(p.headers["content-range"], "bytes 10-19/256");
    assert_eq!(&body[..], &(10u8..20).collect::<Vec<_>>()[..]);

    let req = get("/static/data.bin")
        .header("range", "bytes=-6")
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert_eq!(p.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&body[..], &(250u8..=255).collect::<Vec<_>>()[..]);

    let req = get("/static/data.bin")
        .header("range", "bytes=300-400")
        .body(Empty::new())
        .unwrap();
    let (p, _) = send(addr, req).await;
    assert_eq!(p.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(p.headers["content-range"], "bytes */256");

    // Several ranges: the whole file, not a refusal.
    let req = get("/static/data.bin")
        .header("range", "bytes=0-1, 10-19")
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(body.len(), 256);
}

#[tokio::test]
async fn precompressed_siblings_follow_accept_encoding() {
    let site = site();
    let files = StaticFiles::alias("/static/", site.root.path().join("static"))
        .precompressed_gzip(true)
        .precompressed_br(true)
        .build()
        .unwrap();
    let addr = serve(files).await;

    let req = get("/static/app.css")
        .header("accept-encoding", "gzip")
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert_eq!(p.headers["content-encoding"], "gzip");
    assert_eq!(p.headers["content-type"], "text/css");
    assert_eq!(p.headers["vary"], "accept-encoding");
    assert_eq!(&body[..], b"GZIP-BYTES");

    let req = get("/static/app.css")
        .header("accept-encoding", "gzip;q=0.5, br")
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert_eq!(p.headers["content-encoding"], "br");
    assert_eq!(&body[..], b"BROTLI-BYTES");

    let (p, body) = send(addr, get("/static/app.css").body(Empty::new()).unwrap()).await;
    assert!(!p.headers.contains_key("content-encoding"));
    assert_eq!(&body[..], b"body { color: red }");

    // No sibling: the plain file even when gzip is accepted.
    let req = get("/static/data.bin")
        .header("accept-encoding", "gzip")
        .body(Empty::new())
        .unwrap();
    let (p, body) = send(addr, req).await;
    assert!(!p.headers.contains_key("content-encoding"));
    assert_eq!(body.len(), 256);
}

#[tokio::test]
async fn index_files_and_directory_redirect() {
    let site = site();
    let default = StaticFiles::alias("/static/", site.root.path().join("static"))
        .build()
        .unwrap();
    let addr = serve(default).await;
    let (p, body) = send(addr, get("/static/sub/").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(&body[..], b"<h1>index</h1>");
    let (p, _) = send(addr, get("/static/sub?x=1").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(p.headers["location"], "/static/sub/?x=1");

    let custom = StaticFiles::alias("/static/", site.root.path().join("static"))
        .index(Some("home.htm"))
        .access_log(false)
        .build()
        .unwrap();
    let addr = serve(custom.clone()).await;
    let (p, body) = send(addr, get("/static/sub/").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.headers["content-type"], "text/html");
    assert_eq!(&body[..], b"<h1>home</h1>");

    // access_log off marks every answer, found or not (in-process: extensions do not
    // cross the wire).
    for path in ["/static/app.css", "/static/missing", "/static/%2e%2e/x"] {
        let req = http::Request::get(path).body(ProxyBody::empty()).unwrap();
        let resp = custom.clone().oneshot(req).await.unwrap();
        assert!(resp.extensions().get::<SkipAccessLog>().is_some(), "{path}");
    }

    let none = StaticFiles::alias("/static/", site.root.path().join("static"))
        .index(None)
        .build()
        .unwrap();
    let addr = serve(none).await;
    let (p, _) = send(addr, get("/static/sub/").body(Empty::new()).unwrap()).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
}

/// Traversal attempts over a raw socket: never the secret, always 400/403/404.
#[tokio::test]
async fn traversal_attempts_never_leave_the_root() {
    let site = site();
    let alias = StaticFiles::alias("/static/", site.root.path().join("static"))
        .build()
        .unwrap();
    let addr = serve(alias).await;
    let attempts: &[(&str, u16)] = &[
        ("/static/../secret.txt", 400),
        ("/static/%2e%2e/secret.txt", 400),
        ("/static/%2E%2e/secret.txt", 400),
        ("/static/.%2e/secret.txt", 400),
        ("/static/sub/../../secret.txt", 400),
        ("/static/..%2fsecret.txt", 400),
        ("/static/..%2Fsecret.txt", 400),
        ("/static/%2e%2e%2fsecret.txt", 400),
        ("/static/..%5csecret.txt", 400),
        ("/static/..\\secret.txt", 400),
        ("/static/app.css%00.png", 400),
        ("/static/%00", 400),
        ("/static/%zz", 400),
        ("/static/link-out", 403),
        ("/static..%2fsecret.txt", 404),
        ("/static../secret.txt", 404),
        ("/secret.txt", 404),
    ];
    for (path, want) in attempts {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let resp = raw(addr, req.as_bytes()).await;
        assert!(!resp.contains("SECRET"), "{path}: {resp}");
        let status = resp.get(9..12).unwrap_or("");
        // hyper itself refuses some request lines (raw `\`) with 400 before we see them.
        assert_eq!(status, want.to_string(), "{path}: {resp}");
    }

    // A symlink inside the root works.
    let resp = raw(
        addr,
        b"GET /static/link-in HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("body { color: red }"), "{resp}");

    // nginx `root`: the same checks; and allowing outside links is explicit.
    let root = StaticFiles::root(site.root.path().join("static"))
        .danger_allow_symlinks_outside_root(true)
        .build()
        .unwrap();
    let addr = serve(root).await;
    let resp = raw(
        addr,
        b"GET /../secret.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let resp = raw(
        addr,
        b"GET /link-out HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.ends_with("OUTSIDE-SECRET"), "{resp}");
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A 200 MiB file streams through with the peak memory of the whole process (server and
/// client) growing by far less than the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_streams_with_bounded_memory() {
    const SIZE: u64 = 200 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    // Sparse: instant to create, reads as zeros, costs no disk.
    let f = std::fs::File::create(dir.path().join("big.bin")).unwrap();
    f.set_len(SIZE).unwrap();
    drop(f);
    let addr = serve(StaticFiles::root(dir.path()).build().unwrap()).await;
    let before = peak_rss();

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx
        .send_request(get("/big.bin").body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], SIZE.to_string().as_str());
    let mut body = resp.into_body();
    let mut total = 0u64;
    let mut largest = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
            largest = largest.max(data.len());
        }
    }
    assert_eq!(total, SIZE);
    assert!(largest <= 1024 * 1024, "chunk of {largest} bytes");
    if let (Some(before), Some(after)) = (before, peak_rss()) {
        let grew = after.saturating_sub(before);
        assert!(grew < 32 * 1024 * 1024, "peak RSS grew by {grew} bytes");
    }
}
