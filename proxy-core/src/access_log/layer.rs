//! [`AccessLogLayer`]: puts an [`AccessLog`] around a service.

use tower_layer::Layer;

use crate::access_log::{AccessLog, AccessLogWriter};

/// Logs every request of the wrapped service to an [`AccessLogWriter`].
///
/// [`AccessLogLayer::off`] is nginx's `access_log off`: the same type, wrapping
/// nothing, so a binary can build every location's stack the same way.
#[derive(Debug, Clone)]
pub struct AccessLogLayer {
    writer: Option<AccessLogWriter>,
}

impl AccessLogLayer {
    /// Log to `writer`.
    pub fn new(writer: AccessLogWriter) -> Self {
        AccessLogLayer {
            writer: Some(writer),
        }
    }

    /// Log nothing (nginx's `access_log off`); requests pass through untouched.
    pub fn off() -> Self {
        AccessLogLayer { writer: None }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog::new(inner, self.writer.clone())
    }
}
