//! Every git2 call in tinyci. Synchronous; the async roles call these through
//! `spawn_blocking`. No git2 type leaks out: callers see [`CommitId`]s, paths and [`GitError`].

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use git2::build::CheckoutBuilder;
use git2::{FetchOptions, FileMode, ObjectType, Oid, Repository, Sort, Tree};
use tinyci_proto::CommitId;

/// A failed git operation, with what we were doing.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct GitError {
    what: String,
    message: String,
}

fn err(what: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let what = what.into();
    move |e| GitError {
        what,
        message: e.message().to_owned(),
    }
}

fn commit_id(oid: Oid) -> Result<CommitId, GitError> {
    CommitId::parse(&oid.to_string()).map_err(|e| GitError {
        what: "reading an object id".into(),
        message: e.to_string(),
    })
}

/// Opens the clone at `path`, failing with a clear message if it is not a git repository.
fn open(path: &Path) -> Result<Repository, GitError> {
    Repository::open(path).map_err(err(format!("opening repository {}", path.display())))
}

/// Fails with a clear message unless `path` is a git repository with an `origin` remote.
pub fn check_repo(path: &Path) -> Result<(), GitError> {
    let repo = open(path)?;
    repo.find_remote("origin").map(|_| ()).map_err(err(format!(
        "finding remote 'origin' of {}",
        path.display()
    )))
}

/// The `.git` directory of the clone at `path`.
pub fn git_dir(path: &Path) -> Result<std::path::PathBuf, GitError> {
    Ok(open(path)?.path().to_path_buf())
}

/// The branch a clone tracks when none is named: its origin's default branch if known,
/// else the branch its HEAD is on.
pub fn default_branch(path: &Path) -> Result<String, GitError> {
    let repo = open(path)?;
    if let Ok(r) = repo.find_reference("refs/remotes/origin/HEAD") {
        if let Some(target) = r.symbolic_target() {
            if let Some(b) = target.strip_prefix("refs/remotes/origin/") {
                return Ok(b.to_owned());
            }
        }
    }
    let head = repo.head().map_err(err("reading HEAD"))?;
    head.shorthand()
        .filter(|s| *s != "HEAD")
        .map(str::to_owned)
        .ok_or_else(|| GitError {
            what: "choosing a branch".into(),
            message: "HEAD is detached; pass --branch".into(),
        })
}

fn fetch_origin(repo: &Repository, refspecs: &[&str]) -> Result<(), GitError> {
    let mut remote = repo
        .find_remote("origin")
        .map_err(err("finding remote 'origin'"))?;
    let mut opts = FetchOptions::new();
    opts.download_tags(git2::AutotagOption::None);
    remote
        .fetch(refspecs, Some(&mut opts), None)
        .map_err(err("fetching from origin"))
}

/// Fetches `branch` from origin and returns its tip.
pub fn fetch_branch_tip(path: &Path, branch: &str) -> Result<CommitId, GitError> {
    let repo = open(path)?;
    let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
    fetch_origin(&repo, &[&refspec])?;
    let oid = repo
        .refname_to_id(&format!("refs/remotes/origin/{branch}"))
        .map_err(err(format!("reading branch {branch} of origin")))?;
    commit_id(oid)
}

/// The commits after `since` up to and including `tip`, oldest first, at most `max`.
///
/// When `since` is not an ancestor of `tip` (history was rewritten), only `tip` is returned:
/// re-testing a whole rewritten history is never what the user wanted.
pub fn commits_between(
    path: &Path,
    since: &CommitId,
    tip: &CommitId,
    max: usize,
) -> Result<Vec<CommitId>, GitError> {
    if since == tip {
        return Ok(Vec::new());
    }
    let repo = open(path)?;
    let tip_oid = Oid::from_str(tip.as_str()).map_err(err("parsing tip"))?;
    let since_oid = Oid::from_str(since.as_str()).map_err(err("parsing last commit"))?;
    let is_ancestor = repo.find_commit(since_oid).is_ok()
        && repo
            .graph_descendant_of(tip_oid, since_oid)
            .map_err(err("comparing commits"))?;
    if !is_ancestor {
        tracing::warn!(since = %since, tip = %tip, "last reported commit is not an ancestor of the tip (history rewritten?); reporting the tip only");
        return Ok(vec![tip.clone()]);
    }
    let mut walk = repo.revwalk().map_err(err("walking history"))?;
    walk.set_sorting(Sort::TOPOLOGICAL | Sort::REVERSE)
        .map_err(err("walking history"))?;
    walk.push(tip_oid).map_err(err("walking history"))?;
    walk.hide(since_oid).map_err(err("walking history"))?;
    let mut out = Vec::new();
    for oid in walk.take(max) {
        out.push(commit_id(oid.map_err(err("walking history"))?)?);
    }
    Ok(out)
}

/// What [`Workspace::checkout`] did.
#[derive(Debug, Clone, Copy)]
pub struct Checkout {
    /// Whether the commit had to be fetched first.
    pub fetched: bool,
    /// Whether only what changed was touched (else libgit2's full checkout ran).
    pub incremental: bool,
}

/// The object directory of origin, when origin is a directory on this machine.
///
/// Reading it in place (an alternate object store, kept in memory only: nothing is written
/// to the clone) makes every commit of origin visible at once, with no fetch: the same idea
/// as `git clone --shared`, for a runner whose master repository is local. A remote origin
/// (any URL with a scheme or `host:path`) is fetched from as usual.
fn local_origin_objects(repo: &Repository, clone: &Path) -> Option<PathBuf> {
    let remote = repo.find_remote("origin").ok()?;
    let url = remote.url()?;
    let dir = if let Some(p) = url.strip_prefix("file://") {
        PathBuf::from(p)
    } else if url.contains("://")
        || url
            .split('/')
            .next()
            .is_some_and(|first| first.contains(':'))
    {
        return None;
    } else {
        clone.join(url)
    };
    [dir.join(".git").join("objects"), dir.join("objects")]
        .into_iter()
        .find(|d| d.join("info").is_dir() || d.join("pack").is_dir())
}

/// How long [`Workspace::probe_origin`] waits for origin to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Files changed by the previous job are found by their ctime, which only the kernel sets;
/// the kernel stamps it from a coarse clock, so the threshold leaves this much slack
/// (files our own checkout wrote in that window are merely re-hashed).
const CTIME_SLACK: Duration = Duration::from_millis(100);

/// A runner's clone, kept open between jobs so each checkout touches only what changed.
pub struct Workspace {
    path: PathBuf,
    repo: Repository,
    /// Whether origin's object store is read in place (origin is a local directory).
    borrowed: bool,
    /// The commit last checked out and the time after which any change to the work tree
    /// was made by someone else (the job that ran there).
    clean: Option<(Oid, SystemTime)>,
}

impl Workspace {
    /// Opens the clone at `path`; it must have an `origin` remote. A local origin's
    /// objects are read in place (see [`local_origin_objects`]).
    pub fn open(path: &Path) -> Result<Workspace, GitError> {
        Workspace::open_with(path, true)
    }

    /// Opens the clone at `path` and always fetches what it lacks.
    pub fn open_fetching(path: &Path) -> Result<Workspace, GitError> {
        Workspace::open_with(path, false)
    }

    fn open_with(path: &Path, borrow: bool) -> Result<Workspace, GitError> {
        // Objects come from our own clone; re-hashing each one on every read (libgit2's
        // default) was a tenth of a checkout's time.
        git2::opts::strict_hash_verification(false);
        check_repo(path)?;
        let repo = open(path)?;
        let borrowed = match local_origin_objects(&repo, path).filter(|_| borrow) {
            Some(objects) => repo
                .odb()
                .and_then(|odb| odb.add_disk_alternate(&objects.to_string_lossy()))
                .map_err(|e| tracing::warn!(error = %e, "cannot read origin's objects in place; fetching instead"))
                .is_ok(),
            None => false,
        };
        Ok(Workspace {
            path: path.to_path_buf(),
            repo,
            borrowed,
            clean: None,
        })
    }

    /// Checks that origin answers: `git ls-remote ORIGIN-URL HEAD`, with a
    /// deadline of [`PROBE_TIMEOUT`], given up at once when `cancel` fires. A paused
    /// runner calls this until it succeeds.
    pub fn probe_origin(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), GitError> {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let fail = |message: String| GitError {
            what: "reaching origin".into(),
            message,
        };
        // Asked from outside the clone, so a damaged clone (a garbled HEAD) is not taken
        // for an unreachable origin.
        let url = self
            .repo
            .find_remote("origin")
            .ok()
            .and_then(|r| r.url().map(str::to_owned))
            .ok_or_else(|| fail("the clone has no readable 'origin' remote".into()))?;
        let is_path = !url.contains("://")
            && !url
                .split('/')
                .next()
                .is_some_and(|first| first.contains(':'));
        let url = if is_path {
            self.path.join(&url).display().to_string()
        } else {
            url
        };
        let mut child = Command::new("git")
            .args(["ls-remote", "--", &url, "HEAD"])
            .current_dir("/")
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| fail(format!("cannot run git: {e}")))?;
        let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
        let kill = |child: &mut std::process::Child| {
            // SAFETY: kill(2) of the process group we just made for this git.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.by_ref().take(4096).read_to_string(&mut stderr);
                    }
                    let stderr = stderr.trim();
                    return Err(fail(if stderr.is_empty() {
                        format!("git ls-remote {status}")
                    } else {
                        stderr.to_owned()
                    }));
                }
                Ok(None) => {}
                Err(e) => {
                    kill(&mut child);
                    return Err(fail(e.to_string()));
                }
            }
            if cancel.is_cancelled() {
                kill(&mut child);
                return Err(fail("cancelled".into()));
            }
            if std::time::Instant::now() >= deadline {
                kill(&mut child);
                return Err(fail(format!("no answer within {PROBE_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether commits are read from origin's object store in place instead of fetched.
    pub fn borrows_origin(&self) -> bool {
        self.borrowed
    }

    /// The clone's work tree.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the work tree exactly `commit`: fetches only when the commit is not there
    /// yet; removes every untracked or ignored file and undoes every change the previous
    /// job made; leaves HEAD detached at the commit.
    ///
    /// The first checkout after start (and any case the fast path does not handle:
    /// submodules, `.gitattributes` filters, autocrlf) is libgit2's full checkout. After
    /// that, one walk of the work tree (an lstat per entry, a hash only for entries changed
    /// since the last checkout) puts it back to the last commit, and then only the files
    /// that differ between the two commits are written.
    pub fn checkout(&mut self, commit: &CommitId) -> Result<Checkout, GitError> {
        let oid = Oid::from_str(commit.as_str()).map_err(err("parsing commit"))?;
        let mut fetched = false;
        if self.repo.find_commit(oid).is_err() {
            fetch_origin(&self.repo, &["+refs/heads/*:refs/remotes/origin/*"])?;
            fetched = true;
        }
        let target = self.repo.find_commit(oid).map_err(err(format!(
            "finding commit {commit} (not on any branch of origin?)"
        )))?;
        let mut incremental = false;
        if let Some((head, since)) = self.clean.take() {
            match self.incremental(head, &target, since) {
                Ok(()) => incremental = true,
                Err(e) => {
                    tracing::debug!(error = %e, "incremental checkout not possible; doing a full one");
                }
            }
        }
        if !incremental {
            let mut opts = CheckoutBuilder::new();
            opts.force().remove_untracked(true).remove_ignored(true);
            self.repo
                .checkout_tree(target.as_object(), Some(&mut opts))
                .map_err(err(format!("checking out {commit}")))?;
        }
        self.repo
            .set_head_detached(oid)
            .map_err(err(format!("moving HEAD to {commit}")))?;
        self.clean = Some((oid, SystemTime::now() - CTIME_SLACK));
        Ok(Checkout {
            fetched,
            incremental,
        })
    }

    fn incremental(
        &self,
        head: Oid,
        target: &git2::Commit,
        since: SystemTime,
    ) -> Result<(), GitError> {
        let fail = |m: &str| GitError {
            what: "incremental checkout".into(),
            message: m.to_owned(),
        };
        if self.repo.head().ok().and_then(|h| h.target()) != Some(head) {
            return Err(fail("HEAD moved since the last checkout"));
        }
        let config = self.repo.config().map_err(err("reading config"))?;
        if config.get_bool("core.autocrlf").unwrap_or(false) {
            return Err(fail("core.autocrlf is set"));
        }
        let head_tree = self
            .repo
            .find_commit(head)
            .and_then(|c| c.tree())
            .map_err(err("reading the last tree"))?;
        let new_tree = target.tree().map_err(err("reading the target tree"))?;
        for t in [&head_tree, &new_tree] {
            if t.get_name(".gitattributes").is_some() {
                return Err(fail(".gitattributes may ask for filters"));
            }
        }
        self.restore_dir(Path::new(""), &head_tree, since)?;
        self.apply(Path::new(""), &head_tree, &new_tree)?;
        Ok(())
    }

    /// Turns directory `rel`, which holds `old`, into `new`: only subtrees whose ids differ
    /// are visited, and within a directory removals come before writes (a name can change
    /// from file to directory or back).
    fn apply(&self, rel: &Path, old: &Tree<'_>, new: &Tree<'_>) -> Result<(), GitError> {
        let is_tree = |mode: i32| mode_of(mode) == FileMode::Tree;
        for o in old.iter() {
            let Some(name) = o.name() else { continue };
            let keep = new
                .get_name(name)
                .is_some_and(|n| is_tree(n.filemode()) == is_tree(o.filemode()));
            if !keep {
                remove_any(&self.path.join(rel).join(name)).map_err(io_err("removing a file"))?;
            }
        }
        for n in new.iter() {
            let Some(name) = n.name() else { continue };
            let child = rel.join(name);
            let before = old.get_name(name);
            if before
                .as_ref()
                .is_some_and(|o| o.id() == n.id() && o.filemode() == n.filemode())
            {
                continue;
            }
            let before_tree = before.filter(|o| is_tree(o.filemode())).map(|o| o.id());
            match (mode_of(n.filemode()), before_tree) {
                (FileMode::Tree, Some(o)) => {
                    self.apply(&child, &self.tree(o)?, &self.tree(n.id())?)?;
                }
                (FileMode::Tree, None) => self.write_any(&child, n.id(), FileMode::Tree)?,
                (mode, _) => self.write_entry(&child, n.id(), mode)?,
            }
        }
        Ok(())
    }

    fn tree(&self, id: Oid) -> Result<Tree<'_>, GitError> {
        self.repo.find_tree(id).map_err(err("reading a tree"))
    }

    /// The tree at directory `rel` of `root`.
    fn subtree<'r>(&'r self, root: &Tree<'r>, rel: &Path) -> Result<Tree<'r>, GitError> {
        if rel.as_os_str().is_empty() {
            return Ok(root.clone());
        }
        let entry = root
            .get_path(rel)
            .map_err(err("finding a directory's tree"))?;
        self.tree(entry.id())
    }

    /// Puts directory `rel` back to `head` (the root tree): untracked entries removed,
    /// tracked entries changed since `since` restored, missing ones written. A directory
    /// whose entry list did not change since then (its ctime says so) is only checked for
    /// files changed in place, without looking at its tree.
    fn restore_dir(&self, rel: &Path, head: &Tree<'_>, since: SystemTime) -> Result<(), GitError> {
        let dir = self.path.join(rel);
        let dir_md = fs::symlink_metadata(&dir).map_err(io_err("reading the work tree"))?;
        let listing_changed = ctime(&dir_md) >= since;
        let mut loaded: Option<Tree<'_>> = None;
        let mut present: HashSet<OsString> = HashSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing the work tree"))? {
            let entry = entry.map_err(io_err("listing the work tree"))?;
            let name = entry.file_name();
            if rel.as_os_str().is_empty() && name == ".git" {
                continue;
            }
            let md = entry.metadata().map_err(io_err("reading the work tree"))?;
            if !listing_changed && ctime(&md) < since {
                // The common case, so no path is built for it.
                if md.is_dir() {
                    self.restore_dir(&rel.join(&name), head, since)?;
                }
                continue;
            }
            let child = rel.join(&name);
            if loaded.is_none() {
                loaded = Some(self.subtree(head, rel)?);
            }
            let Some(tree) = loaded.as_ref() else {
                continue;
            };
            let full = self.path.join(&child);
            let Some(te) = name.to_str().and_then(|n| tree.get_name(n)) else {
                // Not in the commit: the previous job made it.
                remove_any(&full).map_err(io_err("removing an untracked file"))?;
                continue;
            };
            present.insert(name);
            let mode = mode_of(te.filemode());
            match mode {
                FileMode::Tree => {
                    if md.is_dir() {
                        self.restore_dir(&child, head, since)?;
                    } else {
                        remove_any(&full).map_err(io_err("removing a file"))?;
                        self.write_any(&child, te.id(), FileMode::Tree)?;
                    }
                }
                FileMode::Blob | FileMode::BlobExecutable | FileMode::Link => {
                    let changed = ctime(&md) >= since
                        || md.is_dir()
                        || md.file_type().is_symlink() != (mode == FileMode::Link);
                    if changed && !self.same_content(&full, &md, te.id(), mode) {
                        self.write_entry(&child, te.id(), mode)?;
                    }
                }
                _ => {
                    return Err(GitError {
                        what: "incremental checkout".into(),
                        message: format!("{} is a submodule", child.display()),
                    })
                }
            }
        }
        if !listing_changed {
            return Ok(());
        }
        if loaded.is_none() {
            loaded = Some(self.subtree(head, rel)?);
        }
        let Some(tree) = loaded.as_ref() else {
            return Ok(());
        };
        for te in tree.iter() {
            let Some(name) = te.name() else { continue };
            if present.contains(std::ffi::OsStr::new(name)) {
                continue;
            }
            self.write_any(&rel.join(name), te.id(), mode_of(te.filemode()))?;
        }
        Ok(())
    }

    /// Whether the file at `full` already holds blob `id` with the right type and mode.
    fn same_content(&self, full: &Path, md: &fs::Metadata, id: Oid, mode: FileMode) -> bool {
        match mode {
            FileMode::Link => {
                md.file_type().is_symlink()
                    && fs::read_link(full).ok().is_some_and(|t| {
                        self.repo
                            .find_blob(id)
                            .is_ok_and(|b| b.content() == t.as_os_str().as_encoded_bytes())
                    })
            }
            _ => {
                md.is_file()
                    && (md.mode() & 0o111 != 0) == (mode == FileMode::BlobExecutable)
                    && Oid::hash_file(ObjectType::Blob, full).is_ok_and(|h| h == id)
            }
        }
    }

    /// Writes tree entry `id` at `rel`: a whole directory, a file or a symlink.
    fn write_any(&self, rel: &Path, id: Oid, mode: FileMode) -> Result<(), GitError> {
        if mode != FileMode::Tree {
            return self.write_entry(rel, id, mode);
        }
        fs::create_dir_all(self.path.join(rel)).map_err(io_err("creating a directory"))?;
        for te in self.tree(id)?.iter() {
            let Some(name) = te.name() else { continue };
            self.write_any(&rel.join(name), te.id(), mode_of(te.filemode()))?;
        }
        Ok(())
    }

    /// Writes blob `id` at `rel` as a file (with its mode) or a symlink.
    fn write_entry(&self, rel: &Path, id: Oid, mode: FileMode) -> Result<(), GitError> {
        let full = self.path.join(rel);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).map_err(io_err("creating a directory"))?;
        }
        if let Ok(md) = fs::symlink_metadata(&full) {
            if md.is_dir() || md.file_type().is_symlink() || mode == FileMode::Link {
                remove_any(&full).map_err(io_err("replacing an entry"))?;
            }
        }
        let blob = self.repo.find_blob(id).map_err(err("reading a blob"))?;
        match mode {
            FileMode::Blob | FileMode::BlobExecutable => {
                fs::write(&full, blob.content()).map_err(io_err("writing a file"))?;
                let bits = if mode == FileMode::BlobExecutable {
                    0o755
                } else {
                    0o644
                };
                fs::set_permissions(&full, fs::Permissions::from_mode(bits))
                    .map_err(io_err("setting a file mode"))?;
            }
            FileMode::Link => {
                let target = std::ffi::OsStr::from_bytes(blob.content());
                std::os::unix::fs::symlink(target, &full).map_err(io_err("writing a symlink"))?;
            }
            _ => {
                return Err(GitError {
                    what: "incremental checkout".into(),
                    message: format!("{} is not a file", rel.display()),
                })
            }
        }
        Ok(())
    }
}

/// The mode of a tree entry (git2 gives the raw number).
fn mode_of(raw: i32) -> FileMode {
    match raw {
        0o040000 => FileMode::Tree,
        0o100644 => FileMode::Blob,
        0o100755 => FileMode::BlobExecutable,
        0o120000 => FileMode::Link,
        0o160000 => FileMode::Commit,
        _ => FileMode::Unreadable,
    }
}

fn ctime(md: &fs::Metadata) -> SystemTime {
    UNIX_EPOCH
        + Duration::new(
            md.ctime().max(0) as u64,
            md.ctime_nsec().clamp(0, 999_999_999) as u32,
        )
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        // Gone, or a parent is now a file: either way there is nothing to remove.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> GitError {
    move |e| GitError {
        what: what.into(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=master",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn commit(dir: &Path, file: &str, body: &str) -> CommitId {
        std::fs::write(dir.join(file), body).unwrap();
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-qm", file]);
        CommitId::parse(&git(dir, &["rev-parse", "HEAD"])).unwrap()
    }

    #[test]
    fn lists_new_commits_oldest_first_and_checks_out_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let master = tmp.path().join("master");
        std::fs::create_dir(&master).unwrap();
        git(&master, &["init", "-q"]);
        let c1 = commit(&master, "a.txt", "1");
        git(tmp.path(), &["clone", "-q", "master", "clone"]);
        let clone = tmp.path().join("clone");
        assert_eq!(default_branch(&clone).unwrap(), "master");
        let c2 = commit(&master, "b.txt", "2");
        let c3 = commit(&master, "c.txt", "3");
        let tip = fetch_branch_tip(&clone, "master").unwrap();
        assert_eq!(tip, c3);
        assert_eq!(
            commits_between(&clone, &c1, &tip, 100).unwrap(),
            vec![c2.clone(), c3.clone()]
        );
        assert_eq!(
            commits_between(&clone, &c1, &tip, 1).unwrap(),
            vec![c2.clone()]
        );
        assert!(commits_between(&clone, &c3, &tip, 100).unwrap().is_empty());

        // A runner clone: check out c3, leave junk, go back to c1: no trace of c3 or junk.
        git(tmp.path(), &["clone", "-q", "master", "runner"]);
        let runner = tmp.path().join("runner");
        // Fresh workspaces each time: these are libgit2's full checkouts (the fallback).
        let full = |c: &CommitId| Workspace::open(&runner).unwrap().checkout(c).unwrap();
        assert!(!full(&c3).incremental);
        assert!(runner.join("c.txt").exists());
        std::fs::write(runner.join("junk.pyc"), "x").unwrap();
        std::fs::create_dir(runner.join("__pycache__")).unwrap();
        std::fs::write(runner.join("__pycache__/m.pyc"), "x").unwrap();
        let co = full(&c1);
        assert!(!co.fetched && !co.incremental);
        assert!(!runner.join("c.txt").exists());
        assert!(!runner.join("junk.pyc").exists());
        assert!(!runner.join("__pycache__").exists());
        assert!(runner.join("a.txt").exists());

        // A commit the runner has never seen: read in place from the local origin...
        let c4 = commit(&master, "d.txt", "4");
        let mut ws = Workspace::open(&runner).unwrap();
        assert!(ws.borrows_origin());
        assert!(!ws.checkout(&c4).unwrap().fetched);
        assert!(runner.join("d.txt").exists());
        // ...or fetched, by a workspace that does not borrow.
        git(tmp.path(), &["clone", "-q", "master", "fetcher"]);
        let c5 = commit(&master, "e.txt", "5");
        let mut ws = Workspace::open_fetching(&tmp.path().join("fetcher")).unwrap();
        assert!(!ws.borrows_origin());
        assert!(ws.checkout(&c5).unwrap().fetched);
        assert!(tmp.path().join("fetcher/e.txt").exists());
    }

    /// Every entry under `dir` (but `.git`): path → (kind, content or link target, exec).
    fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, (char, Vec<u8>, bool)> {
        let mut out = std::collections::BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                if rel == ".git" {
                    continue;
                }
                let md = fs::symlink_metadata(&p).unwrap();
                if md.file_type().is_symlink() {
                    let t = fs::read_link(&p).unwrap();
                    out.insert(rel, ('l', t.as_os_str().as_encoded_bytes().to_vec(), false));
                } else if md.is_dir() {
                    out.insert(rel, ('d', Vec::new(), false));
                    stack.push(p);
                } else {
                    out.insert(rel, ('f', fs::read(&p).unwrap(), md.mode() & 0o111 != 0));
                }
            }
        }
        out
    }

    #[test]
    fn incremental_checkout_undoes_the_last_job_and_matches_a_fresh_checkout() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("master");
        fs::create_dir_all(m.join("dir/sub")).unwrap();
        git(tmp.path(), &["init", "-q", "master"]);
        fs::write(m.join("dir/b.txt"), "b").unwrap();
        fs::write(m.join("dir/sub/c.txt"), "c").unwrap();
        fs::write(m.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(m.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        let c1 = commit(&m, "a.txt", "a");
        symlink("a.txt", m.join("link")).unwrap();
        fs::write(m.join("dir/sub/c.txt"), "c2").unwrap();
        let c2 = commit(&m, "a.txt", "a2");
        fs::remove_file(m.join("dir/sub/c.txt")).unwrap();
        fs::remove_file(m.join("link")).unwrap();
        symlink("run.sh", m.join("link")).unwrap();
        fs::set_permissions(m.join("run.sh"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir_all(m.join("new")).unwrap();
        let c3 = commit(&m, "new/d.txt", "d");
        fs::remove_file(m.join("dir/b.txt")).unwrap();
        fs::create_dir_all(m.join("dir/b.txt")).unwrap();
        let c4 = commit(&m, "dir/b.txt/inner", "typechange");

        git(tmp.path(), &["clone", "-q", "master", "runner"]);
        git(tmp.path(), &["clone", "-q", "master", "fresh"]);
        let (runner, fresh) = (tmp.path().join("runner"), tmp.path().join("fresh"));
        let mut ws = Workspace::open(&runner).unwrap();
        assert!(
            !ws.checkout(&c1).unwrap().incremental,
            "the first checkout is a full one"
        );

        let mess = |r: &Path| {
            fs::write(r.join("junk.pyc"), "x").unwrap();
            fs::create_dir_all(r.join("__pycache__/deep")).unwrap();
            fs::write(r.join("__pycache__/deep/m.pyc"), "x").unwrap();
            fs::write(r.join("dir/junk"), "x").unwrap();
            fs::write(r.join("a.txt"), "changed by the job").unwrap();
            let _ = fs::remove_file(r.join("dir/sub/c.txt"));
            let _ = fs::remove_file(r.join("run.sh"));
            symlink("/etc/passwd", r.join("run.sh")).unwrap();
        };
        for target in [&c2, &c3, &c4, &c1, &c3] {
            mess(&runner);
            let co = ws.checkout(target).unwrap();
            assert!(
                co.incremental,
                "checkout of {target} fell back to a full one"
            );
            git(&fresh, &["checkout", "-q", "--detach", target.as_str()]);
            git(&fresh, &["clean", "-qfdx"]);
            assert_eq!(snapshot(&runner), snapshot(&fresh), "work tree of {target}");
        }
    }

    #[test]
    fn unknown_commit_and_missing_repo_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Workspace::open(tmp.path()).err().unwrap();
        assert!(e.to_string().contains("opening repository"), "{e}");

        let m = tmp.path().join("master");
        std::fs::create_dir(&m).unwrap();
        git(&m, &["init", "-q"]);
        commit(&m, "a.txt", "1");
        git(tmp.path(), &["clone", "-q", "master", "clone"]);
        let mut ws = Workspace::open(&tmp.path().join("clone")).unwrap();
        let nowhere = CommitId::parse(&"a".repeat(40)).unwrap();
        let e = ws.checkout(&nowhere).unwrap_err();
        assert!(e.to_string().contains("not on any branch of origin"), "{e}");
    }
}
