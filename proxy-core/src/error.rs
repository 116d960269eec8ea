//! The crate's error type: one opaque [`Error`] with a [`Kind`], the side it came from
//! and whether a retry on another upstream is safe.
//!
//! Errors never leave a service as `Err`: the edge turns them into responses with
//! [`Error::status`] (returning `Err` from a hyper service drops the connection with no
//! response at all).
//!
//! ```
//! use proxy_core::error::{Error, Kind};
//! let e = Error::new(Kind::UpstreamConnect);
//! assert_eq!(e.status(), http::StatusCode::BAD_GATEWAY);
//! assert!(e.is_retryable());
//! ```

use std::fmt;

use http::StatusCode;

/// A boxed, thread-safe error, as carried in [`Error::source`](std::error::Error::source).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, with one status per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// The upstream could not be connected to (refused, unreachable): 502, retryable.
    UpstreamConnect,
    /// Connecting to the upstream took longer than the connect timeout: 504, retryable.
    UpstreamConnectTimeout,
    /// The upstream did not answer (or stalled) within the read timeout: 504.
    UpstreamTimeout,
    /// The upstream sent something that is not a valid HTTP response, or closed or reset
    /// the connection before a complete response header: 502.
    UpstreamProtocol,
    /// Sending the request body to the upstream failed or stalled: 502.
    UpstreamSend,
    /// No upstream server is available (all marked down or at `max_conns`): 502.
    NoLiveUpstreams,
    /// The client's request was malformed: 400.
    BadRequest,
    /// The client's request body is larger than allowed: 413.
    BodyTooLarge,
    /// The client stopped sending its body within the body timeout: 408.
    ClientTimeout,
    /// The client's connection failed while the proxy read from or wrote to it.
    Downstream,
    /// A local resource (temporary file, disk) failed: 500.
    Internal,
}

/// Which side of the proxy an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Side {
    /// The client (downstream) side.
    Downstream,
    /// The upstream server side.
    Upstream,
    /// The proxy itself.
    Internal,
}

/// A proxy failure: a [`Kind`] plus an optional cause.
pub struct Error {
    kind: Kind,
    source: Option<BoxError>,
}

impl Error {
    /// An error of the given kind with no cause.
    pub fn new(kind: Kind) -> Self {
        Error { kind, source: None }
    }

    /// An error of the given kind caused by `source`.
    pub fn with_source(kind: Kind, source: impl Into<BoxError>) -> Self {
        Error {
            kind,
            source: Some(source.into()),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Which side of the proxy the failure came from.
    pub fn side(&self) -> Side {
        match self.kind {
            Kind::UpstreamConnect
            | Kind::UpstreamConnectTimeout
            | Kind::UpstreamTimeout
            | Kind::UpstreamProtocol
            | Kind::UpstreamSend
            | Kind::NoLiveUpstreams => Side::Upstream,
            Kind::BadRequest | Kind::BodyTooLarge | Kind::ClientTimeout | Kind::Downstream => {
                Side::Downstream
            }
            Kind::Internal => Side::Internal,
        }
    }

    /// The status a client gets for this failure.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::UpstreamConnect
            | Kind::UpstreamProtocol
            | Kind::UpstreamSend
            | Kind::NoLiveUpstreams => StatusCode::BAD_GATEWAY,
            Kind::UpstreamConnectTimeout | Kind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            // 499 is nginx's "client closed request"; nobody receives it, it is for logs.
            Kind::Downstream => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the request may be tried on another upstream server: true only when the
    /// upstream cannot have started processing it (nginx's `error`/`timeout` on connect).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            Kind::UpstreamConnect | Kind::UpstreamConnectTimeout
        )
    }

    /// Whether this is a timeout of any phase.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self.kind,
            Kind::UpstreamConnectTimeout | Kind::UpstreamTimeout | Kind::ClientTimeout
        )
    }

    /// Whether the failure counts against an upstream server's health (nginx's
    /// `max_fails` bookkeeping: connect errors, timeouts and invalid responses).
    pub fn counts_as_upstream_failure(&self) -> bool {
        matches!(
            self.kind,
            Kind::UpstreamConnect
                | Kind::UpstreamConnectTimeout
                | Kind::UpstreamTimeout
                | Kind::UpstreamProtocol
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::UpstreamConnect => "upstream connect failed",
            Kind::UpstreamConnectTimeout => "upstream connect timed out",
            Kind::UpstreamTimeout => "upstream timed out",
            Kind::UpstreamProtocol => "invalid upstream response",
            Kind::UpstreamSend => "sending request to upstream failed",
            Kind::NoLiveUpstreams => "no live upstreams",
            Kind::BadRequest => "bad request",
            Kind::BodyTooLarge => "request body too large",
            Kind::ClientTimeout => "client timed out",
            Kind::Downstream => "client connection failed",
            Kind::Internal => "internal error",
        };
        match &self.source {
            Some(s) => write!(f, "{what}: {s}"),
            None => f.write_str(what),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
