//! Notices the database's files being deleted, moved or replaced under a running
//! dispatcher, and saves what the open database still holds.
//!
//! An open SQLite database keeps working after its files are unlinked: the dispatcher
//! would go on recording into files that no path names, and the next start would find an
//! empty history (and run again every commit submitted again). So the store thread looks
//! every [`WATCH_EVERY`] whether the state directory, `tinyci.db` and its `-wal` are still
//! the files it opened. When one is not, the dispatcher stops, and its last act is to copy
//! the open database (`VACUUM INTO`, which reads through the open files) to
//! [`RESCUED_FILE`] beside where it belongs; the next start puts that copy in place
//! ([`install_rescued`]) before opening the database. Nothing acknowledged is lost.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::results::STATE_DIR;

/// How often the files are looked at.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The name the saved copy of a lost database gets in the state directory.
pub const RESCUED_FILE: &str = "tinyci.db.rescued";

/// A file's identity: device and inode.
type Ident = (u64, u64);

fn ident(path: &Path) -> Option<Ident> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The identities of the state directory and the database's files, as opened.
#[derive(Debug)]
pub struct FileWatch {
    state_dir: PathBuf,
    db: PathBuf,
    wal: PathBuf,
    state_id: Option<Ident>,
    db_id: Option<Ident>,
    /// Taken once the file exists (SQLite creates it with the first write).
    wal_id: Option<Ident>,
}

impl FileWatch {
    /// Notes the files of the database `db` (in the state directory) as they are now.
    pub fn new(db: &Path) -> FileWatch {
        let state_dir = db.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        FileWatch {
            state_id: ident(&state_dir),
            db_id: ident(db),
            wal_id: ident(&wal),
            state_dir,
            db: db.to_path_buf(),
            wal,
        }
    }

    /// Whether the state directory is still the one opened (this dispatcher holds its
    /// lock).
    pub fn state_dir_is_ours(&self) -> bool {
        self.state_id.is_some() && ident(&self.state_dir) == self.state_id
    }

    /// What changed since [`FileWatch::new`], in words; `None` while every file is the
    /// one opened.
    pub fn lost(&mut self) -> Option<String> {
        let changed = |path: &Path, was: Option<Ident>| match (ident(path), was) {
            (None, _) => Some(format!("{} was deleted or moved", path.display())),
            (Some(now), Some(was)) if now != was => {
                Some(format!("{} was replaced by another file", path.display()))
            }
            _ => None,
        };
        if let Some(what) = changed(&self.state_dir, self.state_id) {
            return Some(what);
        }
        if let Some(what) = changed(&self.db, self.db_id) {
            return Some(what);
        }
        match self.wal_id {
            None => {
                self.wal_id = ident(&self.wal);
                None
            }
            Some(_) => changed(&self.wal, self.wal_id),
        }
    }
}

/// Where to save the open database of `results_dir` once its files are lost: the state
/// directory (made again if it is gone), unless another process holds it (a second
/// dispatcher started on the directory meanwhile): then a dot-file beside it that no start
/// picks up by itself. `ours`: the state directory is still the one this dispatcher
/// locked. Returns the path, and the lock taken on a new state directory while the copy
/// is written.
pub fn rescue_target(results_dir: &Path, ours: bool) -> (PathBuf, Option<crate::lock::DirLock>) {
    let state = results_dir.join(STATE_DIR);
    if ours {
        let target = state.join(RESCUED_FILE);
        let _ = std::fs::remove_file(&target);
        return (target, None);
    }
    if std::fs::create_dir_all(&state).is_ok() {
        if let Ok(lock) = crate::lock::DirLock::acquire(&state, "dispatcher") {
            let target = state.join(RESCUED_FILE);
            let _ = std::fs::remove_file(&target);
            return (target, Some(lock));
        }
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    (
        results_dir.join(format!(".tinyci-rescued-{stamp}.db")),
        None,
    )
}

/// What a person does with the copy saved at `to` by [`rescue_target`]'s choice.
pub fn what_next(to: &Path) -> String {
    if to.file_name() == Some(std::ffi::OsStr::new(RESCUED_FILE)) {
        return "the next start puts it in place: start the dispatcher again".into();
    }
    format!(
        "it could not go where the next start looks ({STATE_DIR} is held by another process, or is not a directory): to restore this history, stop every dispatcher on this results directory, make {STATE_DIR} a directory, move {} to {STATE_DIR}/{RESCUED_FILE} and start one (the database there is replaced)",
        to.display()
    )
}

/// Puts a database saved by a dispatcher that lost its files in place of `db` (and drops
/// `db`'s `-wal` and `-shm`, which belong to the lost one). Call it with the state
/// directory locked and before anything opens the database. Returns whether there was one.
pub fn install_rescued(db: &Path) -> std::io::Result<bool> {
    let Some(state) = db.parent() else {
        return Ok(false);
    };
    let rescued = state.join(RESCUED_FILE);
    if !rescued.exists() {
        return Ok(false);
    }
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(PathBuf::from(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // The result files may have gone with the rest (`rm -rf test_results`): the start
    // checks every one against the database and rewrites what is missing.
    if let Err(e) = rusqlite::Connection::open(&rescued).and_then(|c| {
        c.execute(
            "UPDATE commits SET file_synced = 0 WHERE status = 'finished'",
            [],
        )
    }) {
        tracing::warn!(error = %e, "cannot mark the saved database's result files for a check; missing ones are not rewritten");
    }
    std::fs::rename(&rescued, db)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_moved_and_replaced_files_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(STATE_DIR);
        std::fs::create_dir(&state).unwrap();
        let db = state.join("tinyci.db");
        std::fs::write(&db, "x").unwrap();
        let mut w = FileWatch::new(&db);
        assert_eq!(w.lost(), None);
        // The -wal appears later: noted, then watched.
        let wal = state.join("tinyci.db-wal");
        std::fs::write(&wal, "w").unwrap();
        assert_eq!(w.lost(), None);
        std::fs::remove_file(&wal).unwrap();
        assert!(w.lost().unwrap().contains("tinyci.db-wal was deleted"));

        let mut w = FileWatch::new(&db);
        std::fs::write(state.join("other"), "y").unwrap();
        std::fs::rename(state.join("other"), &db).unwrap();
        assert!(w.lost().unwrap().contains("replaced"));

        let mut w = FileWatch::new(&db);
        std::fs::rename(&state, dir.path().join("moved")).unwrap();
        assert!(w.lost().unwrap().contains(".tinyci was deleted or moved"));
    }

    #[test]
    fn a_copy_saved_aside_says_how_to_restore_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(STATE_DIR);
        // Ours: in place for the next start.
        std::fs::create_dir(&state).unwrap();
        let (to, lock) = rescue_target(dir.path(), true);
        assert_eq!(to, state.join(RESCUED_FILE));
        assert!(lock.is_none());
        assert!(what_next(&to).contains("the next start puts it in place"));
        // Held by another process (a second dispatcher): aside, with what to do.
        let other = crate::lock::DirLock::acquire(&state, "dispatcher").unwrap();
        let (to, lock) = rescue_target(dir.path(), false);
        assert!(lock.is_none());
        assert_eq!(to.parent(), Some(dir.path()));
        let next = what_next(&to);
        assert!(next.contains("stop every dispatcher"), "{next}");
        assert!(next.contains(&to.display().to_string()), "{next}");
        drop(other);
        // A plain file where the directory was: aside too.
        std::fs::remove_dir(&state).unwrap();
        std::fs::write(&state, "").unwrap();
        let (to, _) = rescue_target(dir.path(), false);
        assert_ne!(to.file_name(), Some(std::ffi::OsStr::new(RESCUED_FILE)));
        let e = crate::results::prepare_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains(".tinyci is not a directory"), "{e}");
    }

    #[test]
    fn a_rescued_database_is_put_in_place_without_the_old_wal() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tinyci.db");
        assert!(!install_rescued(&db).unwrap());
        std::fs::write(&db, "old").unwrap();
        std::fs::write(dir.path().join("tinyci.db-wal"), "old wal").unwrap();
        std::fs::write(dir.path().join(RESCUED_FILE), "saved").unwrap();
        assert!(install_rescued(&db).unwrap());
        assert_eq!(
            std::fs::read_to_string(&db).unwrap(),
            "saved",
            "not a database: as is"
        );
        assert!(!dir.path().join("tinyci.db-wal").exists());
        assert!(!dir.path().join(RESCUED_FILE).exists());
    }
}
