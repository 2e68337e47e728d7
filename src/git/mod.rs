//! Everything tinyci does with git, in one place. The `git` command does what changes a
//! repository — fetch, checkout, clean, submodules — as the tools users trust do (GitLab
//! Runner, Buildkite's agent, `actions/checkout`), so every origin, transport and setting
//! git knows works as it does for the user; libgit2 (through `git2`) only reads: refs,
//! history, the spec file in a commit's tree. No git2 type leaks out: callers see
//! [`CommitId`]s, paths and [`GitError`].
//!
//! - [`command`]: running `git` with deadlines, cancellation and an owned process group.
//! - [`clone`]: what a `REPO_CLONE` argument must be, its origin, its lock.
//! - [`workspace`]: the runner's clone, made exactly a commit before every job.

mod clone;
mod command;
mod workspace;

use std::path::Path;

use git2::{ObjectType, Oid, Repository, Sort};
use tinyci_proto::CommitId;
use tokio_util::sync::CancellationToken;

pub use clone::{Clone, Origin};
pub use command::FetchLimits;
pub use workspace::{Prepared, Workspace, WorkspaceOptions};

use command::Git;

/// What kind of trouble a [`GitError`] is, so callers never decide by the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitErrorKind {
    /// The origin could not be reached or stopped answering (network, auth, timeout).
    Unreachable,
    /// The origin answered but does not have what we asked for.
    NotFound,
    /// The clone is broken and could not be repaired.
    Damaged,
    /// A local I/O problem: disk full, permissions, git missing.
    Io,
    /// The path given as a clone is not usable; the message says what to pass instead.
    Usage,
    /// The operation was cancelled (the process is stopping).
    Cancelled,
}

/// A failed git operation: what we were doing, what went wrong, and what kind of trouble.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct GitError {
    what: String,
    message: String,
    /// The kind of trouble.
    pub kind: GitErrorKind,
}

impl GitError {
    fn new(what: impl Into<String>, message: impl Into<String>, kind: GitErrorKind) -> GitError {
        GitError {
            what: what.into(),
            message: message.into(),
            kind,
        }
    }

    /// A blocking task that panicked or was cancelled.
    pub fn task_failed(e: tokio::task::JoinError) -> GitError {
        GitError::new("a git task", e.to_string(), GitErrorKind::Io)
    }

    /// Whether the origin could not be reached (as opposed to a local problem).
    pub fn origin_unreachable(&self) -> bool {
        self.kind == GitErrorKind::Unreachable
    }
}

fn err(what: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let what = what.into();
    move |e| GitError::new(what, e.message(), GitErrorKind::Damaged)
}

fn commit_id(oid: Oid) -> Result<CommitId, GitError> {
    CommitId::parse(&oid.to_string())
        .map_err(|e| GitError::new("reading an object id", e.to_string(), GitErrorKind::Damaged))
}

/// Opens the clone at `path` for reading.
fn open(path: &Path) -> Result<Repository, GitError> {
    Repository::open(path).map_err(err(format!("opening repository {}", path.display())))
}

/// The branch a clone follows when none is named: its origin's default branch if known,
/// else the branch its HEAD is on.
pub fn default_branch(path: &Path) -> Result<String, GitError> {
    let repo = open(path)?;
    if let Ok(r) = repo.find_reference("refs/remotes/origin/HEAD") {
        if let Some(b) = r
            .symbolic_target()
            .and_then(|t| t.strip_prefix("refs/remotes/origin/"))
        {
            return Ok(b.to_owned());
        }
    }
    let head = repo.head().map_err(|e| {
        GitError::new(
            "choosing a branch",
            format!("{} (an empty repository?); pass --branch NAME", e.message()),
            GitErrorKind::Usage,
        )
    })?;
    head.shorthand()
        .filter(|s| *s != "HEAD")
        .map(str::to_owned)
        .ok_or_else(|| {
            GitError::new(
                "choosing a branch",
                "HEAD is detached; pass --branch NAME",
                GitErrorKind::Usage,
            )
        })
}

/// Fetches `branch` from the clone's origin (the `git` command, bounded by `limits`) and
/// returns its tip.
pub async fn fetch_branch_tip(
    path: &Path,
    branch: &str,
    limits: FetchLimits,
    cancel: &CancellationToken,
) -> Result<CommitId, GitError> {
    let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
    let git = Git {
        dir: path,
        limits,
        cancel,
        local: false,
    };
    git.run(
        "fetching from origin",
        GitErrorKind::Unreachable,
        [
            "fetch",
            "--quiet",
            "--progress",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-recurse-submodules",
            "origin",
            &refspec,
        ],
    )
    .await
    .map_err(|e| match e.kind {
        // git exits 128 both for "no such remote ref" and for network trouble; its words say
        // which, and only the first is the user's to fix.
        GitErrorKind::Unreachable if e.message.contains("couldn't find remote ref") => {
            GitError::new(
                format!("fetching branch {branch} from origin"),
                format!(
                    "origin has no branch {branch:?} (an empty repository?); pass --branch NAME"
                ),
                GitErrorKind::NotFound,
            )
        }
        _ => e,
    })?;
    let path = path.to_path_buf();
    let branch = branch.to_owned();
    tokio::task::spawn_blocking(move || {
        let repo = open(&path)?;
        let oid = repo
            .refname_to_id(&format!("refs/remotes/origin/{branch}"))
            .map_err(err(format!("reading branch {branch} of origin")))?;
        commit_id(oid)
    })
    .await
    .map_err(|e| GitError::new("reading the fetched tip", e.to_string(), GitErrorKind::Io))?
}

/// A file at the root of a commit's tree, read from the object database (never through
/// the file system, so a symlink or a special file cannot make us read anything else).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootFile {
    /// No entry of that name.
    Missing,
    /// A regular file's bytes.
    Bytes(Vec<u8>),
    /// A regular file larger than the limit (its size).
    TooLarge(u64),
    /// A symbolic link (its target is not followed).
    Symlink,
    /// A directory or a submodule.
    NotAFile,
}

/// Reads `name` at the root of `commit` in the clone at `path`, refusing more than `max`
/// bytes, and says whether the root has a directory `dir`.
pub fn read_root_file(
    path: &Path,
    commit: &CommitId,
    name: &str,
    max: u64,
    dir: &str,
) -> Result<(RootFile, bool), GitError> {
    let repo = open(path)?;
    let oid = Oid::from_str(commit.as_str()).map_err(err("parsing a commit id"))?;
    let tree = repo
        .find_commit(oid)
        .and_then(|c| c.tree())
        .map_err(err(format!("reading the tree of {commit}")))?;
    let has_dir = tree
        .get_name(dir)
        .is_some_and(|e| e.kind() == Some(ObjectType::Tree));
    let Some(entry) = tree.get_name(name) else {
        return Ok((RootFile::Missing, has_dir));
    };
    let file = match entry.filemode() {
        0o120000 => RootFile::Symlink,
        0o100644 | 0o100755 => {
            let odb = repo.odb().map_err(err("opening the object database"))?;
            let (size, _) = odb
                .read_header(entry.id())
                .map_err(err(format!("reading {name}")))?;
            if size as u64 > max {
                RootFile::TooLarge(size as u64)
            } else {
                let blob = repo
                    .find_blob(entry.id())
                    .map_err(err(format!("reading {name}")))?;
                RootFile::Bytes(blob.content().to_vec())
            }
        }
        _ => RootFile::NotAFile,
    };
    Ok((file, has_dir))
}

/// The repository of the current directory (or of `GIT_DIR`, as git sets it for hooks),
/// if there is one.
fn open_here() -> Option<Repository> {
    Repository::open_from_env().ok()
}

/// Resolves `name` (a ref, an abbreviated id, `HEAD~2`…) to a commit in the repository of
/// the current directory. `None` when there is no repository here or the name does not
/// name a commit in it.
pub fn resolve_here(name: &str) -> Option<CommitId> {
    let repo = open_here()?;
    let obj = repo.revparse_single(name).ok()?;
    let commit = obj.peel_to_commit().ok()?;
    commit_id(commit.id()).ok()
}

/// What the repository of the current directory says of a full object id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HereSays {
    /// There is no repository here (or it cannot be read): nothing is known.
    NoRepository,
    /// The repository here does not have it.
    Missing,
    /// A commit, or a tag that points at one: this commit.
    Commit(CommitId),
    /// Another kind of object ("blob", "tree", a tag of one of them).
    NotACommit(&'static str),
}

/// Looks `id` up in the repository of the current directory.
pub fn look_up_here(id: &CommitId) -> HereSays {
    let Some(repo) = open_here() else {
        return HereSays::NoRepository;
    };
    let Ok(oid) = git2::Oid::from_str(id.as_str()) else {
        return HereSays::Missing;
    };
    let Ok(obj) = repo.find_object(oid, None) else {
        return HereSays::Missing;
    };
    let says = match obj.peel_to_commit() {
        Ok(c) => commit_id(c.id()).map_or(HereSays::Missing, HereSays::Commit),
        Err(_) => HereSays::NotACommit(match obj.kind() {
            Some(git2::ObjectType::Blob) => "a blob (a file's contents)",
            Some(git2::ObjectType::Tree) => "a tree (a directory)",
            Some(git2::ObjectType::Tag) => "a tag of something that is not a commit",
            _ => "not a commit",
        }),
    };
    says
}

/// The git directory of the repository at `path` (bare or not), made absolute, and
/// whether it is bare.
pub fn git_dir_of(path: &Path) -> Result<(std::path::PathBuf, bool), GitError> {
    let repo = Repository::open(path).map_err(|e| {
        GitError::new(
            format!("opening repository {}", path.display()),
            e.message(),
            GitErrorKind::Usage,
        )
    })?;
    let dir = repo.path();
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    Ok((dir, repo.is_bare()))
}

/// The branch HEAD points at in the repository at `path` (`main` for `refs/heads/main`),
/// even when that branch has no commit yet.
pub fn head_branch(path: &Path) -> Result<String, GitError> {
    let repo = open(path)?;
    let head = repo.find_reference("HEAD").map_err(err("reading HEAD"))?;
    head.symbolic_target()
        .and_then(|t| t.strip_prefix("refs/heads/"))
        .map(str::to_owned)
        .ok_or_else(|| {
            GitError::new(
                "reading HEAD",
                "HEAD is detached; name the branch to follow with --branch",
                GitErrorKind::Usage,
            )
        })
}

/// The commits a push moved `branch` over: from `old` (exclusive) to `new`, oldest first,
/// at most `max`, read from the repository of the current directory (or `GIT_DIR`). A new
/// branch (`old` is zeros) gives just its tip, as the observer does on its first start.
pub fn pushed_commits(old: &str, new: &CommitId, max: usize) -> Result<Vec<CommitId>, GitError> {
    let repo = open_here().ok_or_else(|| {
        GitError::new(
            "opening the pushed repository",
            "no repository here (a hook runs inside one)",
            GitErrorKind::Usage,
        )
    })?;
    let Ok(since) = CommitId::parse(old) else {
        return Ok(vec![new.clone()]);
    };
    if old.bytes().all(|b| b == b'0') {
        return Ok(vec![new.clone()]);
    }
    commits_between(repo.path(), &since, new, max)
}

/// Sets `key` to `value` in the local configuration of the repository at `path`.
pub fn set_config(path: &Path, key: &str, value: &str) -> Result<(), GitError> {
    let repo = open(path)?;
    let mut cfg = repo
        .config()
        .and_then(|c| c.open_level(git2::ConfigLevel::Local))
        .map_err(err("opening the repository's configuration"))?;
    cfg.set_str(key, value)
        .map_err(err(format!("setting {key}")))
}

/// The value of `key` as the repository at `path` sees it (all levels), if set.
pub fn get_config(path: &Path, key: &str) -> Option<String> {
    let repo = Repository::open(path).ok()?;
    let cfg = repo.config().ok()?;
    cfg.get_string(key).ok()
}

/// The commit `refs/heads/<branch>` points at in the repository at `path` (an origin on
/// this machine, read in place: no fetch, no process).
pub fn branch_tip(path: &Path, branch: &str) -> Result<CommitId, GitError> {
    let repo = open(path)?;
    let oid = repo
        .refname_to_id(&format!("refs/heads/{branch}"))
        .map_err(|e| {
            GitError::new(
                format!("reading branch {branch} of {}", path.display()),
                e.message(),
                GitErrorKind::NotFound,
            )
        })?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// Runs git in `dir` with a fixed identity; panics with git's words on failure.
    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
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

    /// Writes `file` in `dir`, commits everything, returns the commit.
    pub(crate) fn commit(dir: &Path, file: &str, body: &str) -> CommitId {
        if let Some(parent) = Path::new(file).parent() {
            std::fs::create_dir_all(dir.join(parent)).unwrap();
        }
        std::fs::write(dir.join(file), body).unwrap();
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-qm", file]);
        CommitId::parse(&git(dir, &["rev-parse", "HEAD"])).unwrap()
    }

    #[tokio::test]
    async fn lists_new_commits_oldest_first() {
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
        let cancel = CancellationToken::new();
        let tip = fetch_branch_tip(&clone, "master", FetchLimits::default(), &cancel)
            .await
            .unwrap();
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
        let e = fetch_branch_tip(&clone, "nope", FetchLimits::default(), &cancel)
            .await
            .unwrap_err();
        assert_eq!(e.kind, GitErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("--branch"), "{e}");
    }

    #[test]
    fn spec_file_is_read_from_the_tree_never_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path();
        git(m, &["init", "-q"]);
        std::fs::create_dir(m.join("tests")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", m.join(".tinyci.toml")).unwrap();
        let c1 = commit(m, "tests/t.py", "");
        assert_eq!(
            read_root_file(m, &c1, ".tinyci.toml", 10, "tests").unwrap(),
            (RootFile::Symlink, true)
        );
        std::fs::remove_file(m.join(".tinyci.toml")).unwrap();
        let c2 = commit(m, ".tinyci.toml", "0123456789abc");
        assert_eq!(
            read_root_file(m, &c2, ".tinyci.toml", 10, "tests").unwrap(),
            (RootFile::TooLarge(13), true)
        );
        assert_eq!(
            read_root_file(m, &c2, ".tinyci.toml", 100, "nope").unwrap(),
            (RootFile::Bytes(b"0123456789abc".to_vec()), false)
        );
        assert_eq!(
            read_root_file(m, &c2, "absent", 100, "tests").unwrap().0,
            RootFile::Missing
        );
    }
}
