//! The nudge: a FIFO in the origin's git directory that tinyci's `reference-transaction`
//! hook writes a byte to the moment the followed branch moves, so the observer polls at
//! once instead of at its next tick (the poll stays as the safety net).
//!
//! Each observer has its own FIFO, `<origin git dir>/tinyci-nudge/observer-<pid>`, opened
//! read-write so it never reports end-of-file and a writer never blocks on opening it. The
//! hook opens every FIFO there read-write too (which never blocks on Linux) and writes
//! one byte, which never blocks either unless 64 KiB of nudges went unread. A FIFO left by
//! an observer killed with `kill -9` costs the hook nothing (its bytes vanish when the hook
//! closes it) and is removed by the next observer that starts.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::net::unix::pipe;

/// The directory in the origin's git directory that holds the observers' FIFOs.
pub const NUDGE_DIR: &str = "tinyci-nudge";

/// An observer's FIFO, removed when dropped.
pub struct Nudge {
    path: PathBuf,
    rx: pipe::Receiver,
}

impl Nudge {
    /// Creates this process's FIFO under `origin_git_dir`, and removes those of observers
    /// that are gone.
    pub fn create(origin_git_dir: &Path) -> io::Result<Nudge> {
        let dir = origin_git_dir.join(NUDGE_DIR);
        std::fs::create_dir_all(&dir)?;
        remove_stale(&dir);
        let path = dir.join(format!("observer-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o622) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let rx = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&path)?;
        Ok(Nudge { path, rx })
    }

    /// The FIFO's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next nudge, and swallows any that came with it.
    pub async fn wait(&mut self) {
        let mut buf = [0u8; 256];
        loop {
            if self.rx.readable().await.is_err() {
                // Never expected; do not spin on a broken FIFO.
                std::future::pending::<()>().await;
            }
            let mut got = false;
            loop {
                match self.rx.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => got = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
            if got {
                return;
            }
        }
    }
}

impl Drop for Nudge {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the FIFOs of observers whose process is gone.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("observer-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn a_byte_written_by_a_hook_wakes_the_observer_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut nudge = Nudge::create(dir.path()).unwrap();
        assert!(nudge.path().starts_with(dir.path().join(NUDGE_DIR)));
        // What the hook does: open read-write (never blocks), write, close.
        for _ in 0..3 {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(nudge.path())
                .unwrap();
            f.write_all(b"x").unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), nudge.wait())
            .await
            .expect("nudged");
        // The three nudges were one wake-up.
        let again =
            tokio::time::timeout(std::time::Duration::from_millis(50), nudge.wait()).await;
        assert!(again.is_err(), "no second wake-up without a new nudge");
        let path = nudge.path().to_path_buf();
        drop(nudge);
        assert!(!path.exists(), "the FIFO is removed with the observer");
    }

    #[test]
    fn fifos_of_dead_observers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let nd = dir.path().join(NUDGE_DIR);
        std::fs::create_dir_all(&nd).unwrap();
        // pid_max is at most 4194304: this pid cannot exist.
        std::fs::write(nd.join("observer-4194399"), b"").unwrap();
        std::fs::write(nd.join("unrelated"), b"").unwrap();
        let nudge = Nudge::create(dir.path()).unwrap();
        assert!(!nd.join("observer-4194399").exists());
        assert!(nd.join("unrelated").exists());
        drop(nudge);
    }
}
