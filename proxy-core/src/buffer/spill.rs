//! Temporary files for bodies that do not fit in memory.
//!
//! A spill file is created in the configured directory and unlinked at once, keeping two
//! descriptors open: one to append with, one to read back with, each with its own offset
//! (nginx does the same). It disappears from the directory immediately and from the
//! disk when both descriptors are closed, whichever way the request ends: completed,
//! failed, client gone, task cancelled, or the process killed.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::fs::File;

use crate::error::{Error, Kind};

/// Largest single read from a spill file.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// A (writer, reader) pair on a fresh, already unlinked temporary file in `dir`.
pub(crate) async fn create(dir: Arc<Path>) -> io::Result<(File, File)> {
    // Creating and unlinking are blocking system calls: keep them off the reactor.
    let files = tokio::task::spawn_blocking(move || {
        let named = tempfile::NamedTempFile::new_in(&*dir)?;
        let reader = named.reopen()?;
        // Unlinks the path; the descriptors stay valid.
        let writer = named.into_file();
        Ok::<_, io::Error>((writer, reader))
    })
    .await
    .map_err(io::Error::other)??;
    Ok((File::from_std(files.0), File::from_std(files.1)))
}

/// Read at most `max` bytes (and at most [`READ_CHUNK`]) from `file` into a new chunk.
pub(crate) fn poll_read_chunk(
    file: &mut File,
    buf: &mut BytesMut,
    max: u64,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Bytes>> {
    let want = usize::try_from(max).unwrap_or(READ_CHUNK).min(READ_CHUNK);
    if buf.capacity() < want {
        buf.reserve(want);
    }
    let n = std::task::ready!(tokio_util::io::poll_read_buf(
        Pin::new(file),
        cx,
        &mut (&mut *buf).limit(want)
    ))?;
    if n == 0 {
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "spill file shorter than what was written to it",
        )));
    }
    Poll::Ready(Ok(buf.split().freeze()))
}

/// A request body read back from a spill file: exactly `remaining` bytes, then the
/// trailers if the client sent any.
pub(crate) struct FileBody {
    file: File,
    remaining: u64,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
}

impl FileBody {
    pub(crate) fn new(file: File, len: u64, trailers: Option<HeaderMap>) -> Self {
        FileBody {
            file,
            remaining: len,
            buf: BytesMut::new(),
            trailers,
        }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        match std::task::ready!(poll_read_chunk(
            &mut this.file,
            &mut this.buf,
            this.remaining,
            cx
        )) {
            Ok(chunk) => {
                this.remaining -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Err(e) => {
                this.remaining = 0;
                this.trailers = None;
                Poll::Ready(Some(Err(Error::with_source(Kind::Internal, e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_spill_file_is_unlinked_at_once_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = create(Arc::from(dir.path())).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
        let body = FileBody::new(r, data.len() as u64, None);
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], &data[..]);
    }
}
