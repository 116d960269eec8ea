//! [`AccessLogWriter`]: the handle requests log through, and the background task that
//! formats, buffers and writes their lines.

use std::fmt;
use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::access_log::format::{Format, Record};

/// Where the lines go.
#[non_exhaustive]
pub enum Target {
    /// The process's standard output (containers, systemd's journal).
    Stdout,
    /// A file, opened for appending and created if missing; reopened by
    /// [`AccessLogWriter::reopen`].
    File(PathBuf),
    /// Any async writer (a pipe, a socket, an in-memory buffer in tests). Reopening
    /// keeps it.
    Writer(Box<dyn AsyncWrite + Send + Unpin>),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Stdout => f.write_str("Stdout"),
            Target::File(p) => f.debug_tuple("File").field(p).finish(),
            Target::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

/// Counters of one access log, shared by its writer handles and readable by metrics.
#[derive(Debug, Default)]
pub struct AccessLogStats {
    dropped: AtomicU64,
    written: AtomicU64,
    write_errors: AtomicU64,
}

impl AccessLogStats {
    /// Lines dropped because the queue was full (the writer fell behind) or the writer
    /// task had stopped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines handed to the target.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Failed writes or reopens of the target (each loses the buffered lines).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
}

/// Builds an [`AccessLogWriter`]; see [`AccessLogWriter::builder`].
#[derive(Debug)]
pub struct AccessLogWriterBuilder {
    target: Target,
    format: Format,
    buffer: usize,
    flush: Duration,
    queue: NonZeroUsize,
}

impl AccessLogWriterBuilder {
    /// The line format. Default [`Format::CombinedTimed`].
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// nginx's `buffer=`: lines are collected until this many bytes are waiting, then
    /// written in one go. `0` writes every line as it comes. Default 32 KiB.
    pub fn buffer(mut self, bytes: usize) -> Self {
        self.buffer = bytes;
        self
    }

    /// nginx's `flush=`: buffered lines are written at least this often. Default 5 s.
    /// A zero duration is taken as 1 ms.
    pub fn flush(mut self, every: Duration) -> Self {
        self.flush = every.max(Duration::from_millis(1));
        self
    }

    /// How many finished requests may wait for the writer task. When the queue is full
    /// (the disk or stdout cannot keep up) further lines are dropped and counted in
    /// [`AccessLogStats::dropped`]; requests never wait for the log. Default 4096.
    pub fn queue(mut self, records: NonZeroUsize) -> Self {
        self.queue = records;
        self
    }

    /// Open the target and make the writer and its task. The task must be spawned (or
    /// otherwise polled) for lines to be written; it ends, after a last flush, when
    /// every handle is dropped.
    ///
    /// Fails if the file cannot be opened for appending.
    pub fn build(self) -> io::Result<(AccessLogWriter, WriterTask)> {
        let (sink, path) = match self.target {
            Target::Stdout => (Sink::Stdout(tokio::io::stdout()), None),
            Target::File(path) => (Sink::File(open_std(&path)?), Some(path)),
            Target::Writer(w) => (Sink::Writer(w), None),
        };
        let (tx, rx) = mpsc::channel(self.queue.get());
        let stats = Arc::new(AccessLogStats::default());
        let task = run(Task {
            rx,
            sink,
            path,
            format: self.format,
            buffer: self.buffer,
            flush: self.flush,
            stats: stats.clone(),
        });
        Ok((
            AccessLogWriter { tx, stats },
            WriterTask {
                fut: Box::pin(task),
            },
        ))
    }

    /// [`build`](Self::build) and spawn the task on the current Tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> io::Result<AccessLogWriter> {
        let (writer, task) = self.build()?;
        tokio::spawn(task);
        Ok(writer)
    }
}

/// The handle requests log through: cheap to clone, all clones feed one task.
///
/// Logging never waits: a line that finds the queue full is dropped and counted.
#[derive(Clone)]
pub struct AccessLogWriter {
    tx: mpsc::Sender<Msg>,
    stats: Arc<AccessLogStats>,
}

impl fmt::Debug for AccessLogWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogWriter")
            .field("stats", &self.stats)
            .finish()
    }
}

impl AccessLogWriter {
    /// A writer to `target` with nginx's defaults (`buffer=32k flush=5s`, `combined`
    /// with timings).
    pub fn builder(target: Target) -> AccessLogWriterBuilder {
        AccessLogWriterBuilder {
            target,
            format: Format::default(),
            buffer: 32 * 1024,
            flush: Duration::from_secs(5),
            queue: NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN),
        }
    }

    /// This log's counters.
    pub fn stats(&self) -> Arc<AccessLogStats> {
        self.stats.clone()
    }

    /// Queue a finished request's record; never waits.
    pub(crate) fn log(&self, rec: Record) {
        if self.tx.try_send(Msg::Record(rec)).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Write out every line queued before this call.
    pub async fn flush(&self) -> io::Result<()> {
        self.command(Msg::Flush).await
    }

    /// Write out what is buffered, then close the file and open its path anew: call it
    /// on SIGUSR1 after logrotate renamed the file, and new lines go to a new file at
    /// the configured path. Standard output and custom writers are kept as they are.
    pub async fn reopen(&self) -> io::Result<()> {
        self.command(Msg::Reopen).await
    }

    async fn command(&self, msg: fn(oneshot::Sender<io::Result<()>>) -> Msg) -> io::Result<()> {
        let stopped = || io::Error::other("access log writer task is not running");
        let (reply, done) = oneshot::channel();
        // Commands may wait for room in the queue: they come from signal handlers and
        // shutdown, not from requests.
        self.tx.send(msg(reply)).await.map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

/// The writer's background task: a future to spawn. See
/// [`AccessLogWriterBuilder::build`].
pub struct WriterTask {
    // Boxed once per log at start-up; not on the request path.
    fut: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl fmt::Debug for WriterTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WriterTask")
    }
}

impl Future for WriterTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.fut.as_mut().poll(cx)
    }
}

// Records dominate the queue; boxing them to shrink the rare command variants would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Record(Record),
    Flush(oneshot::Sender<io::Result<()>>),
    Reopen(oneshot::Sender<io::Result<()>>),
}

enum Sink {
    Stdout(tokio::io::Stdout),
    File(tokio::fs::File),
    Writer(Box<dyn AsyncWrite + Send + Unpin>),
}

impl Sink {
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
            // tokio's File hands writes to a blocking thread; flush waits for it.
            Sink::File(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
            Sink::Writer(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }
}

fn open_std(path: &std::path::Path) -> io::Result<tokio::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(tokio::fs::File::from_std(file))
}

struct Task {
    rx: mpsc::Receiver<Msg>,
    sink: Sink,
    path: Option<PathBuf>,
    format: Format,
    buffer: usize,
    flush: Duration,
    stats: Arc<AccessLogStats>,
}

/// Buffered lines and how many there are.
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
}

async fn run(mut t: Task) {
    let mut pending = Pending {
        bytes: Vec::with_capacity(t.buffer.saturating_add(1024).min(1 << 20)),
        lines: 0,
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + t.flush, t.flush);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = t.rx.recv() => match msg {
                None => {
                    let _ = write_out(&mut t, &mut pending).await;
                    return;
                }
                Some(Msg::Record(rec)) => {
                    t.format.write(&rec, &mut pending.bytes);
                    pending.lines += 1;
                    if pending.bytes.len() >= t.buffer {
                        let _ = write_out(&mut t, &mut pending).await;
                    }
                }
                Some(Msg::Flush(reply)) => {
                    let _ = reply.send(write_out(&mut t, &mut pending).await);
                }
                Some(Msg::Reopen(reply)) => {
                    let res = match write_out(&mut t, &mut pending).await {
                        Ok(()) => reopen(&mut t).await,
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(res);
                }
            },
            _ = tick.tick() => {
                let _ = write_out(&mut t, &mut pending).await;
            }
        }
    }
}

async fn write_out(t: &mut Task, pending: &mut Pending) -> io::Result<()> {
    if pending.bytes.is_empty() {
        return Ok(());
    }
    let res = t.sink.write(&pending.bytes).await;
    match &res {
        Ok(()) => {
            t.stats.written.fetch_add(pending.lines, Ordering::Relaxed);
        }
        Err(e) => {
            // Lines that could not be written are lost rather than kept: an unwritable
            // disk must not grow the proxy's memory.
            t.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            t.stats.dropped.fetch_add(pending.lines, Ordering::Relaxed);
            tracing::warn!(error = %e, lines = pending.lines, "access log write failed");
        }
    }
    pending.bytes.clear();
    pending.lines = 0;
    res
}

async fn reopen(t: &mut Task) -> io::Result<()> {
    let Some(path) = &t.path else {
        return Ok(());
    };
    let opened = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await;
    match opened {
        Ok(file) => {
            t.sink = Sink::File(file);
            Ok(())
        }
        Err(e) => {
            // Keep writing to the old file rather than nowhere.
            t.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, path = %path.display(), "access log reopen failed");
            Err(e)
        }
    }
}
