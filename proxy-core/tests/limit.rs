//! Rate and concurrency limits over real sockets: a hyper upstream, the limit layers in
//! front of `Forward`, served by a small accept loop that inserts `ClientInfo` the way
//! the server does, and clients bound to distinct loopback source addresses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::client_info::RealClient;
use proxy_core::limit::{ConnZone, Key, LimitConnLayer, LimitReqLayer, ReqLimit, ReqZone};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::{ClientInfo, ProxyBody, Request, Response, Scheme};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, Semaphore};
use tower::util::BoxCloneService;
use tower::{Layer, ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<Request, Response, Infallible>;

/// The upstream: counts requests; `/slow` reports its arrival and waits for a permit.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    arrived: mpsc::UnboundedReceiver<()>,
    release: Arc<Semaphore>,
}

async fn spawn_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Semaphore::new(0));
    let (tx, arrived) = mpsc::unbounded_channel();
    let (h, r) = (hits.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (h, r, tx) = (h.clone(), r.clone(), tx.clone());
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let (h, r, tx) = (h.clone(), r.clone(), tx.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    if req.uri().path() == "/slow" {
                        let _ = tx.send(());
                        r.acquire().await.unwrap().forget();
                    }
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    Upstream {
        addr,
        hits,
        arrived,
        release,
    }
}

/// The proxy: every connection gets its `ClientInfo`, every request goes through `svc`.
/// HTTP/1.1 and HTTP/2 both, as the lead's server will.
async fn spawn_proxy(svc: Svc) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            let info = ClientInfo::new(peer, addr, Scheme::Http);
            let svc = svc.clone();
            let hyper_svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let mut req = req.map(ProxyBody::from);
                req.extensions_mut().insert(info.clone());
                svc.clone().oneshot(req)
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), hyper_svc)
                    .await;
            });
        }
    });
    addr
}

fn forward(upstream: SocketAddr) -> Forward {
    Forward::new(UpstreamClient::new(ClientConfig::default()), upstream)
}

/// An HTTP/1.1 client connection from source address `from`.
async fn h1_client(
    from: &str,
    to: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let stream = socket.connect(to).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn get(
    client: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Response<Bytes> {
    let mut req = http::Request::get(path).header("host", "app.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client.ready().await.unwrap();
    let resp = client
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

/// The seed's login limit: `rate=5r/m`, `burst=10 nodelay`, answered with 429.
fn auth_layer() -> LimitReqLayer {
    let zone = ReqZone::builder("5r/m".parse().unwrap())
        .name("auth")
        .size_bytes(10 << 20)
        .build();
    LimitReqLayer::new(ReqLimit::new(zone).burst(10).nodelay())
        .status(StatusCode::TOO_MANY_REQUESTS)
}

#[tokio::test]
async fn auth_token_limit_counts_each_client_address_on_its_own() {
    let upstream = spawn_upstream().await;
    let svc = BoxCloneService::new(auth_layer().layer(forward(upstream.addr)));
    let proxy = spawn_proxy(svc).await;

    for from in ["127.0.0.2", "127.0.0.3"] {
        // Separate connections from one address share the address's budget.
        let mut a = h1_client(from, proxy).await;
        let mut b = h1_client(from, proxy).await;
        for i in 0..11 {
            let c = if i % 2 == 0 { &mut a } else { &mut b };
            let resp = get(c, "/auth/token", &[]).await;
            assert_eq!(resp.status(), 200, "request {i} from {from}");
        }
        let resp = get(&mut b, "/auth/token", &[]).await;
        assert_eq!(resp.status(), 429, "12th from {from}");
        // 12 049 ms until one request has decayed, less the time the test took.
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((12..=13).contains(&retry), "{retry}");
    }
    assert_eq!(
        upstream.hits.load(Ordering::SeqCst),
        22,
        "rejections never reach upstream"
    );
}

/// Stands in for the forwarded-headers layer: trusts 127.0.0.1 and takes the client from
/// its `X-Forwarded-For`.
#[derive(Clone)]
struct TrustLoopback<S>(S);

impl<S> tower::Service<Request> for TrustLoopback<S>
where
    S: tower::Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> S::Future {
        let trusted =
            ClientInfo::of(&req).is_some_and(|c| c.peer.ip() == IpAddr::from([127, 0, 0, 1]));
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        if let (true, Some(ip)) = (trusted, forwarded) {
            req.extensions_mut().insert(RealClient {
                ip,
                port: None,
                scheme: Scheme::Http,
                host: None,
            });
        }
        self.0.call(req)
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_key_is_the_forwarded_client() {
    let upstream = spawn_upstream().await;
    let zone = ReqZone::builder("1r/m".parse().unwrap()).build();
    let stack = ServiceBuilder::new()
        .layer_fn(TrustLoopback)
        .layer(
            LimitReqLayer::new(ReqLimit::new(zone).nodelay()).status(StatusCode::TOO_MANY_REQUESTS),
        )
        .service(forward(upstream.addr));
    let proxy = spawn_proxy(BoxCloneService::new(stack)).await;

    let mut lb = h1_client("127.0.0.1", proxy).await;
    let xff = |ip| [("x-forwarded-for", ip)];
    assert_eq!(get(&mut lb, "/", &xff("203.0.113.1")).await.status(), 200);
    assert_eq!(get(&mut lb, "/", &xff("203.0.113.1")).await.status(), 429);
    assert_eq!(get(&mut lb, "/", &xff("203.0.113.2")).await.status(), 200);

    // An untrusted peer's header is ignored: it is limited by its own address.
    let mut direct = h1_client("127.0.0.2", proxy).await;
    assert_eq!(
        get(&mut direct, "/", &xff("203.0.113.3")).await.status(),
        200
    );
    assert_eq!(
        get(&mut direct, "/", &xff("203.0.113.4")).await.status(),
        429
    );
}

#[tokio::test]
async fn a_flood_of_keys_keeps_the_zone_within_its_bound() {
    let upstream = spawn_upstream().await;
    let zone = ReqZone::builder("1r/m".parse().unwrap())
        .key(Key::Header(HeaderName::from_static("x-api-key")))
        .capacity(NonZeroUsize::new(256).unwrap())
        .build();
    let layer = LimitReqLayer::new(ReqLimit::new(zone.clone()).nodelay());
    let proxy = spawn_proxy(BoxCloneService::new(layer.layer(forward(upstream.addr)))).await;

    let mut clients = vec![];
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        clients.push(h1_client(from, proxy).await);
    }
    let n = 1024; // four times the capacity
    for i in 0..n {
        let key = format!("key-{i}");
        let c = &mut clients[i % 4];
        assert_eq!(get(c, "/", &[("x-api-key", &key)]).await.status(), 200);
        assert!(zone.len() <= 256);
    }
    assert_eq!(zone.len(), 256);
    // The most recent key is remembered and limited; the oldest was forgotten.
    let last = format!("key-{}", n - 1);
    assert_eq!(
        get(&mut clients[0], "/", &[("x-api-key", &last)])
            .await
            .status(),
        503
    );
    assert_eq!(
        get(&mut clients[0], "/", &[("x-api-key", "key-0")])
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn limit_conn_counts_each_http2_stream() {
    let mut upstream = spawn_upstream().await;
    let zone = ConnZone::builder().name("addr").build();
    let layer = LimitConnLayer::new(zone.clone(), NonZeroU32::MIN);
    let proxy = spawn_proxy(BoxCloneService::new(layer.layer(forward(upstream.addr)))).await;

    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(proxy).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = |path: &str| {
        http::Request::get(format!("http://app.test{path}"))
            .body(Empty::new())
            .unwrap()
    };

    // Stream 1 is held at the upstream.
    let mut s1 = send.clone();
    let slow = tokio::spawn(async move { s1.send_request(request("/slow")).await.unwrap() });
    tokio::time::timeout(Duration::from_secs(5), upstream.arrived.recv())
        .await
        .expect("the slow request reached the upstream");

    // Stream 2 on the same connection, and a second connection from the same address,
    // are each over the cap of one.
    let mut s2 = send.clone();
    assert_eq!(s2.send_request(request("/")).await.unwrap().status(), 503);
    let mut h1 = h1_client("127.0.0.2", proxy).await;
    assert_eq!(get(&mut h1, "/", &[]).await.status(), 503);
    // Another address is not.
    let mut other = h1_client("127.0.0.3", proxy).await;
    assert_eq!(get(&mut other, "/", &[]).await.status(), 200);

    upstream.release.add_permits(1);
    let resp = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    // The slot is given back once the body has been sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !zone.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never released"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(s2.send_request(request("/")).await.unwrap().status(), 200);
}
