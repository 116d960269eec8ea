//! WebSockets over HTTP/2 (RFC 8441) to an HTTP/1.1 WebSocket upstream, over real
//! sockets: an HTTP/2 client opens the WebSocket as an extended CONNECT stream, a real
//! WebSocket server (tungstenite) behind the proxy sees an ordinary HTTP/1.1 upgrade,
//! and frames flow both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// tungstenite's handshake callback returns its own large error type.
#![allow(clippy::result_large_err)]

mod support;

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::router::{Location, Pattern, Router, VirtualServer};
use proxy_core::upstream::{ClientConfig, Forward, UpstreamClient};
use proxy_core::ProxyBody;
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// What the upstream saw of the handshake: method, target, Sec-WebSocket-Protocol.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A WebSocket echo server on 127.0.0.1 that accepts the `chat` subprotocol.
async fn echo_upstream() -> (std::net::SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let callback = |req: &WsRequest, mut resp: WsResponse| {
                    let proto = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .map(|v| v.to_str().unwrap().to_owned());
                    if proto.is_some() {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", "chat".parse().unwrap());
                    }
                    record.lock().unwrap().push((
                        req.method().to_string(),
                        req.uri().to_string(),
                        proto,
                    ));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// An HTTP/2 (prior knowledge) connection to the proxy.
async fn h2(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<ProxyBody> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

fn extended_connect(path: &str, protocol: &'static str) -> http::Request<ProxyBody> {
    let mut req = http::Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(format!("http://h.test{path}"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat")
        .body(ProxyBody::empty())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    req
}

#[tokio::test]
async fn websocket_over_http2_reaches_an_http1_upstream() {
    let (up, seen) = echo_upstream().await;
    // Through the router: an extended CONNECT is routed by its path, like a GET.
    let forward = Forward::new(UpstreamClient::new(ClientConfig::default()), up);
    let router = Router::builder()
        .server(
            VirtualServer::new([]).location(Location::new(Pattern::parse("/ws").unwrap(), forward)),
        )
        .build()
        .unwrap();
    let proxy = Proxy::start(router).await;
    let mut send = h2(proxy.addr).await;
    // The server announced SETTINGS_ENABLE_CONNECT_PROTOCOL, or the client refuses to send.
    send.ready().await.unwrap();
    let mut resp = tokio::time::timeout(
        DEADLINE,
        send.send_request(extended_connect("/ws?room=1", "websocket")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    assert!(!resp.headers().contains_key("sec-websocket-accept"));
    assert!(!resp.headers().contains_key("upgrade"));
    let io = tokio::time::timeout(DEADLINE, hyper::upgrade::on(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Client, None).await;
    for text in ["hello", "over h2"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    // A second WebSocket on the same HTTP/2 connection, beside the first.
    let mut resp2 = send
        .send_request(extended_connect("/ws2", "websocket"))
        .await
        .unwrap();
    assert_eq!(resp2.status(), StatusCode::OK);
    let io2 = hyper::upgrade::on(&mut resp2).await.unwrap();
    let mut ws2 = WebSocketStream::from_raw_socket(TokioIo::new(io2), Role::Client, None).await;
    ws2.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let got = tokio::time::timeout(DEADLINE, ws2.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().as_ref(), [1u8, 2, 3]);
    ws.close(None).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "GET");
    assert_eq!(seen[0].1, "/ws?room=1");
    assert_eq!(seen[0].2.as_deref(), Some("chat"));
    assert_eq!(seen[1].1, "/ws2");
}

#[tokio::test]
async fn refused_upgrade_is_relayed_and_other_protocols_are_400() {
    // An upstream that is not a WebSocket server answers the upgrade with a plain 404.
    let up = Upstream::start(|_req| async {
        let mut resp = http::Response::new(ProxyBody::from("no websocket here"));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp
    })
    .await;
    let proxy = Proxy::start(Forward::new(
        UpstreamClient::new(ClientConfig::default()),
        up.addr,
    ))
    .await;
    let mut send = h2(proxy.addr).await;
    send.ready().await.unwrap();
    let resp = send
        .send_request(extended_connect("/ws", "websocket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    // No protocol an HTTP/1.1 upstream could be asked for.
    let resp = send
        .send_request(extended_connect("/wt", "webtransport"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(up.seen().len(), 1, "nothing more reached the upstream");
}
