//! [`AcmeChallengeLayer`]: answers `GET /.well-known/acme-challenge/<token>` over plain
//! HTTP, for ACME HTTP-01 validation, and passes every other request to the inner
//! service. Answers come from the tokens our own ACME client published in a
//! [`ChallengeStore`], then from files in a webroot directory, laid out as
//! `certbot --webroot -w DIR` writes them (`DIR/.well-known/acme-challenge/<token>`),
//! as nginx's `location ^~ /.well-known/acme-challenge/ { root DIR; }` would serve them.
//!
//! Tokens are checked to be base64url (RFC 8555 §8.3), so a request can never name a
//! path outside the challenge directory.
//!
//! ```
//! use proxy_tls::challenge::{AcmeChallengeLayer, ChallengeStore};
//! use tower::{service_fn, Layer, ServiceExt};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let tokens = ChallengeStore::new();
//! tokens.insert("tok_1", "tok_1.thumbprint");
//! let app = service_fn(|_req: proxy_core::Request| async {
//!     Ok::<_, std::convert::Infallible>(proxy_core::response::status(http::StatusCode::MOVED_PERMANENTLY))
//! });
//! let svc = AcmeChallengeLayer::new().store(tokens).layer(app);
//! let req = http::Request::get("/.well-known/acme-challenge/tok_1").body(Default::default()).unwrap();
//! let resp = svc.clone().oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! let other = http::Request::get("/").body(Default::default()).unwrap();
//! assert_eq!(svc.oneshot(other).await.unwrap().status(), 301);
//! # });
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, StatusCode};
use pin_project_lite::pin_project;
use proxy_core::{ProxyBody, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

/// The path prefix of HTTP-01 challenges.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Largest challenge file served from a webroot (a key authorization is ~90 bytes).
const MAX_CHALLENGE_FILE: u64 = 4096;

/// HTTP-01 key authorizations published by the ACME client, by token. Cheap to clone;
/// clones share the tokens.
#[derive(Debug, Clone, Default)]
pub struct ChallengeStore {
    tokens: Arc<RwLock<HashMap<Box<str>, Bytes>>>,
}

impl ChallengeStore {
    /// An empty store.
    pub fn new() -> Self {
        ChallengeStore::default()
    }

    /// Publish `key_authorization` for `token`.
    pub fn insert(&self, token: &str, key_authorization: &str) {
        let mut map = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        map.insert(
            token.into(),
            Bytes::copy_from_slice(key_authorization.as_bytes()),
        );
    }

    /// Withdraw `token`.
    pub fn remove(&self, token: &str) {
        let mut map = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        map.remove(token);
    }

    fn get(&self, token: &str) -> Option<Bytes> {
        let map = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        map.get(token).cloned()
    }
}

/// Serves ACME HTTP-01 challenges in front of another service. See the
/// [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct AcmeChallengeLayer {
    store: Option<ChallengeStore>,
    webroot: Option<Arc<Path>>,
}

impl AcmeChallengeLayer {
    /// A layer that serves nothing until given a store or a webroot.
    pub fn new() -> Self {
        AcmeChallengeLayer::default()
    }

    /// Answer from the tokens of this store (the built-in ACME client's).
    pub fn store(mut self, store: ChallengeStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Answer from files under `dir/.well-known/acme-challenge/` (certbot's `--webroot`).
    pub fn webroot(mut self, dir: impl Into<PathBuf>) -> Self {
        self.webroot = Some(Arc::from(dir.into()));
        self
    }
}

impl<S> Layer<S> for AcmeChallengeLayer {
    type Service = AcmeChallenge<S>;

    fn layer(&self, inner: S) -> AcmeChallenge<S> {
        AcmeChallenge {
            inner,
            store: self.store.clone(),
            webroot: self.webroot.clone(),
        }
    }
}

/// The service of [`AcmeChallengeLayer`].
#[derive(Debug, Clone)]
pub struct AcmeChallenge<S> {
    inner: S,
    store: Option<ChallengeStore>,
    webroot: Option<Arc<Path>>,
}

impl<S> Service<Request> for AcmeChallenge<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let Some(token) = req.uri().path().strip_prefix(CHALLENGE_PREFIX) else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        let head = req.method() == Method::HEAD;
        if !(head || req.method() == Method::GET) {
            return ResponseFuture::ready(proxy_core::response::status(
                StatusCode::METHOD_NOT_ALLOWED,
            ));
        }
        if !is_token(token) {
            return ResponseFuture::ready(proxy_core::response::status(StatusCode::NOT_FOUND));
        }
        if let Some(found) = self.store.as_ref().and_then(|s| s.get(token)) {
            return ResponseFuture::ready(ok(found, head));
        }
        match &self.webroot {
            Some(root) => {
                let path = root.join(".well-known").join("acme-challenge").join(token);
                ResponseFuture {
                    state: State::File {
                        head,
                        task: tokio::task::spawn_blocking(move || read_small(&path)),
                    },
                }
            }
            None => ResponseFuture::ready(proxy_core::response::status(StatusCode::NOT_FOUND)),
        }
    }
}

/// RFC 8555 tokens are base64url without padding; certbot's are too.
fn is_token(s: &str) -> bool {
    (1..=256).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn read_small(path: &Path) -> Option<Bytes> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    file.take(MAX_CHALLENGE_FILE + 1)
        .read_to_end(&mut buf)
        .ok()?;
    (buf.len() as u64 <= MAX_CHALLENGE_FILE).then(|| Bytes::from(buf))
}

fn ok(body: Bytes, head: bool) -> Response {
    let len = body.len();
    let mut resp = http::Response::new(if head {
        ProxyBody::empty()
    } else {
        ProxyBody::full(body)
    });
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

pin_project! {
    /// The future of [`AcmeChallenge`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] fut: F },
        Ready { resp: Option<Response> },
        File { head: bool, #[pin] task: tokio::task::JoinHandle<Option<Bytes>> },
    }
}

impl<F> ResponseFuture<F> {
    fn inner(fut: F) -> Self {
        ResponseFuture {
            state: State::Inner { fut },
        }
    }

    fn ready(resp: Response) -> Self {
        ResponseFuture {
            state: State::Ready { resp: Some(resp) },
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut } => fut.poll(cx),
            StateProj::Ready { resp } => match resp.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Pending,
            },
            StateProj::File { head, task } => match task.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(Some(body))) => Poll::Ready(Ok(ok(body, *head))),
                Poll::Ready(_) => {
                    Poll::Ready(Ok(proxy_core::response::status(StatusCode::NOT_FOUND)))
                }
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn svc(
        layer: AcmeChallengeLayer,
    ) -> AcmeChallenge<impl Service<Request, Response = Response, Error = Infallible> + Clone> {
        layer.layer(service_fn(|_req: Request| async {
            Ok::<_, Infallible>(proxy_core::response::status(StatusCode::IM_A_TEAPOT))
        }))
    }

    fn req(method: Method, path: &str) -> Request {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(ProxyBody::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn webroot_files_are_served_and_traversal_is_not() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(".well-known/acme-challenge");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("abc-DEF_1"), "abc-DEF_1.key").unwrap();
        std::fs::write(root.path().join("secret"), "no").unwrap();
        let s = svc(AcmeChallengeLayer::new().webroot(root.path()));
        let r = s
            .clone()
            .oneshot(req(Method::GET, "/.well-known/acme-challenge/abc-DEF_1"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            &r.into_body().collect().await.unwrap().to_bytes()[..],
            b"abc-DEF_1.key"
        );
        let r = s
            .clone()
            .oneshot(req(Method::HEAD, "/.well-known/acme-challenge/abc-DEF_1"))
            .await
            .unwrap();
        assert_eq!(
            (r.status().as_u16(), &r.headers()["content-length"]),
            (200, &HeaderValue::from(13))
        );
        for bad in [
            "/.well-known/acme-challenge/..%2Fsecret",
            "/.well-known/acme-challenge/../secret",
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/missing",
        ] {
            let r = s.clone().oneshot(req(Method::GET, bad)).await.unwrap();
            assert_eq!(r.status(), 404, "{bad}");
        }
        let r = s
            .clone()
            .oneshot(req(Method::POST, "/.well-known/acme-challenge/x"))
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
        let r = s
            .oneshot(req(Method::GET, "/.well-known/other"))
            .await
            .unwrap();
        assert_eq!(r.status(), 418);
    }

    #[tokio::test]
    async fn store_tokens_come_and_go() {
        let store = ChallengeStore::new();
        let s = svc(AcmeChallengeLayer::new().store(store.clone()));
        store.insert("t", "t.k");
        let r = s
            .clone()
            .oneshot(req(Method::GET, "/.well-known/acme-challenge/t"))
            .await
            .unwrap();
        assert_eq!(
            &r.into_body().collect().await.unwrap().to_bytes()[..],
            b"t.k"
        );
        store.remove("t");
        let r = s
            .oneshot(req(Method::GET, "/.well-known/acme-challenge/t"))
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }

    proptest! {
        #[test]
        fn tokens_never_contain_path_syntax(s in "\\PC{0,40}") {
            if is_token(&s) {
                prop_assert!(!s.contains('/') && !s.contains('.') && !s.contains('%'));
            }
        }
    }
}
