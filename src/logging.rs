//! Tracing setup shared by the three binaries: human-readable lines on stderr, `RUST_LOG`
//! honoured, `info` by default.
//!
//! Lines are written by a background thread, so a busy dispatcher core formats its log
//! lines but never waits on stderr; lines that come together are written together. The
//! writer never drops lines (it blocks when its buffer is full), and the returned guard
//! flushes what is left when `main` ends.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Installs the stderr subscriber. Call once, first thing in `main`, and keep the guard
/// alive until the end of `main`.
#[must_use = "dropping the guard stops the log writer"]
pub fn init() -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The worker writes every line it finds waiting into this buffer and flushes once the
    // queue is empty: one write per burst of lines instead of one per line (a dispatcher
    // says four lines per job), and a lone line still goes out at once.
    let (writer, guard) =
        NonBlockingBuilder::default()
            .lossy(false)
            .finish(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            ));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    guard
}
