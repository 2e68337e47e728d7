//! Exclusive ownership of a directory by one process: `flock(2)` on the directory itself.
//!
//! The lock lives on the open directory, not on a file inside it, so nothing appears in a
//! work tree (where `git clean` would delete it) and nothing stale is left behind: the
//! kernel releases the lock when the process dies, however it dies. The descriptor is
//! close-on-exec, so a child (a step, a `git`) never inherits it. A refused second process
//! is told the pid of the holder, read from `/proc/locks`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{} is in use by another {what} (pid {}); stop it first, or give this one a directory of its own",
        .path.display(), .holder.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    Held {
        /// The directory.
        path: PathBuf,
        /// What kind of process uses it ("test_runner", "dispatcher" …).
        what: &'static str,
        /// The holder's pid, when the kernel tells.
        holder: Option<u32>,
    },
    /// The directory could not be opened or locked.
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An exclusive lock on a directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DirLock {
    dir: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `path` (a directory) without waiting. `what` names the kind of
    /// process that holds such a lock, for the message a second one gets.
    pub fn acquire(path: &Path, what: &'static str) -> Result<DirLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = File::open(path).map_err(io)?;
        // SAFETY: flock(2) on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = dir
                    .metadata()
                    .ok()
                    .and_then(|md| holder_pid(md.dev(), md.ino()));
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    what,
                    holder,
                });
            }
            return Err(io(e));
        }
        Ok(DirLock {
            dir,
            path: path.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    /// Unlocks before closing. Closing alone is not enough: a child forked by another
    /// thread holds a copy of the descriptor until it execs (close-on-exec acts only then),
    /// and the lock belongs to the open file description, so it would outlive this drop
    /// for that window. `LOCK_UN` releases it for every copy.
    fn drop(&mut self) {
        // SAFETY: flock(2) on a descriptor we own; no memory is involved.
        unsafe { libc::flock(self.dir.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The pid holding a `flock` on the file with this device and inode, from `/proc/locks`
/// (lines like `1: FLOCK  ADVISORY  WRITE 4242 08:01:1311 0 EOF`).
fn holder_pid(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed with "->" and an extra field; skip them.
        if fields.len() < 6 || fields.get(1) == Some(&"->") || fields[1] != "FLOCK" {
            return None;
        }
        let mut id = fields[5].split(':');
        let (maj, min, inode) = (id.next()?, id.next()?, id.next()?);
        let same = u32::from_str_radix(maj, 16).ok()? == major
            && u32::from_str_radix(min, 16).ok()? == minor
            && inode.parse::<u64>().ok()? == ino;
        same.then(|| fields[4].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "test_runner").unwrap();
        // A second open file description conflicts even within one process.
        let e = DirLock::acquire(dir.path(), "test_runner").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("another test_runner"), "{msg}");
        drop(first);
        DirLock::acquire(dir.path(), "test_runner").unwrap();
    }

    #[test]
    fn a_child_between_fork_and_exec_does_not_keep_a_dropped_lock() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::acquire(dir.path(), "dispatcher").unwrap();
        // A child that has forked but not yet exec'd, as any spawn by another thread is
        // for a moment: it holds a copy of every descriptor, the lock's included.
        // SAFETY: the child calls only async-signal-safe functions (nanosleep, _exit).
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            let t = libc::timespec {
                tv_sec: 5,
                tv_nsec: 0,
            };
            // SAFETY: as above.
            unsafe {
                libc::nanosleep(&t, std::ptr::null_mut());
                libc::_exit(0);
            }
        }
        drop(lock);
        let again = DirLock::acquire(dir.path(), "dispatcher");
        // SAFETY: kill and waitpid on the child forked above.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        again.unwrap();
    }

    #[test]
    fn missing_directory_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = DirLock::acquire(&dir.path().join("nope"), "dispatcher").unwrap_err();
        assert!(matches!(e, LockError::Io { .. }), "{e}");
    }
}
