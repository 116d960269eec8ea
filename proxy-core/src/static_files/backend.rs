//! A ServeDir file system backend that refuses anything resolving outside the root.
//!
//! ServeDir never builds a path with `..` in it, but it follows symbolic links wherever they
//! point. Every `open` and `metadata` call here first resolves the path (`realpath`) and
//! checks that the result is still under the canonical root; then it opens the *resolved*
//! path, so the check and the use see the same file. (A writer who can swap directories
//! inside the root between the two system calls could still race it; such a writer
//! already controls what is served.) Both steps run in one blocking-pool task.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tower_http::services::fs::{Backend, File};

/// The marker inside the `io::Error` for a path that resolves outside the root (→ 403).
#[derive(Debug)]
pub(crate) struct OutsideRoot;

impl fmt::Display for OutsideRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("path resolves outside the static root")
    }
}

impl std::error::Error for OutsideRoot {}

/// Whether an error returned by [`Confined`] is the outside-the-root refusal.
pub(crate) fn is_outside_root(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<OutsideRoot>())
}

/// The backend: `root` is canonical (resolved at construction).
#[derive(Clone, Debug)]
pub(crate) struct Confined {
    root: Arc<Path>,
    check: bool,
}

impl Confined {
    pub(crate) fn new(root: Arc<Path>, check_symlinks: bool) -> Self {
        Confined {
            root,
            check: check_symlinks,
        }
    }

    fn resolve(root: &Path, check: bool, path: PathBuf) -> io::Result<PathBuf> {
        if !check {
            return Ok(path);
        }
        let real = std::fs::canonicalize(&path)?;
        if real.starts_with(root) {
            Ok(real)
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, OutsideRoot))
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(e)),
    }
}

impl Backend for Confined {
    type File = ConfinedFile;
    type Metadata = std::fs::Metadata;
    type OpenFuture = BoxFuture<ConfinedFile>;
    type MetadataFuture = BoxFuture<std::fs::Metadata>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        let (root, check) = (self.root.clone(), self.check);
        Box::pin(async move {
            let file = blocking(move || {
                let real = Confined::resolve(&root, check, path)?;
                std::fs::File::open(real)
            })
            .await?;
            Ok(ConfinedFile(tokio::fs::File::from_std(file)))
        })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        let (root, check) = (self.root.clone(), self.check);
        Box::pin(blocking(move || {
            let real = Confined::resolve(&root, check, path)?;
            std::fs::metadata(real)
        }))
    }
}

/// An open file under the root.
#[derive(Debug)]
pub(crate) struct ConfinedFile(tokio::fs::File);

impl AsyncRead for ConfinedFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncSeek for ConfinedFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.0).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.0).poll_complete(cx)
    }
}

impl File for ConfinedFile {
    type Metadata = std::fs::Metadata;
    type MetadataFuture<'a> =
        Pin<Box<dyn Future<Output = io::Result<std::fs::Metadata>> + Send + 'a>>;

    fn metadata(&self) -> Self::MetadataFuture<'_> {
        Box::pin(self.0.metadata())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_symlink_out_of_root_and_allows_inside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("ok"), b"o").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("out"))
                .unwrap();
            std::os::unix::fs::symlink(root.path().join("ok"), root.path().join("in")).unwrap();
        }
        let canon: Arc<Path> = std::fs::canonicalize(root.path()).unwrap().into();
        let b = Confined::new(canon.clone(), true);
        assert!(b.open(canon.join("ok")).await.is_ok());
        assert!(b.open(canon.join("in")).await.is_ok());
        let err = b.open(canon.join("out")).await.unwrap_err();
        assert!(is_outside_root(&err));
        let err = b.metadata(canon.join("out")).await.unwrap_err();
        assert!(is_outside_root(&err));
        let err = b.open(canon.join("missing")).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        // With the check off the link is followed.
        let loose = Confined::new(canon.clone(), false);
        assert!(loose.open(canon.join("out")).await.is_ok());
    }
}
