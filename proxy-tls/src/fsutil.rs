//! Writing certificate and key files safely: to a temporary file in the same directory
//! with the final mode set at creation, then renamed over the target, so a reader (our
//! own reloader, or another process) never sees a half-written key or a key that was
//! briefly world-readable.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Kind};

/// Write `data` to `path` atomically with permission bits `mode` (unix).
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::with_source(Kind::Io, e).at(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        // The mode given at creation is masked by the umask and ignored when the
        // temporary already existed: set it explicitly.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
