//! A WebSocket opened over HTTP/2 (RFC 8441) through the binary's whole `proxy_pass`
//! stack (forwarded headers, request and response buffering, limits, the balancer) to
//! a real WebSocket server speaking HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const DEADLINE: Duration = Duration::from_secs(15);

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_over_http2_through_the_binary() {
    let up = echo_server().await;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("proxy.toml");
    std::fs::write(
        &conf,
        format!(
            "[[server]]\nlisten = [\"{listen}\"]\n\n[[server.location]]\npath = \"/ws/\"\nproxy_pass = \"http://{up}\"\nproxy_read_timeout = \"1h\"\n"
        ),
    )
    .unwrap();
    let _proxy = Running(
        Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["run", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let tcp = loop {
        match TcpStream::connect(listen).await {
            Ok(s) => break s,
            Err(_) if start.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("proxy did not start listening: {e}"),
        }
    };
    // Cleartext HTTP/2 by prior knowledge, as the binary accepts it on plain listeners.
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap();
    let mut req = http::Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(format!("http://{listen}/ws/echo"))
        .header("sec-websocket-version", "13")
        .body(proxy_core::ProxyBody::empty())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = tokio::time::timeout(DEADLINE, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let io = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Client, None).await;
    for text in ["through", "the binary"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
}
