//! Every git2 call in tinyci. Synchronous; the async roles call these through
//! `spawn_blocking`. No git2 type leaks out: callers see [`CommitId`]s, paths and [`GitError`].

use std::path::Path;

use git2::build::CheckoutBuilder;
use git2::{FetchOptions, Oid, Repository, Sort};
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

/// What [`checkout`] did.
#[derive(Debug, Clone, Copy)]
pub struct Checkout {
    /// Whether the commit had to be fetched first.
    pub fetched: bool,
}

/// Makes the work tree of the clone at `path` exactly `commit`: fetches only when the
/// commit is not there yet, checks out incrementally from the current HEAD, and removes
/// every untracked or ignored file a previous job left behind. HEAD is left detached.
pub fn checkout(path: &Path, commit: &CommitId) -> Result<Checkout, GitError> {
    let repo = open(path)?;
    let oid = Oid::from_str(commit.as_str()).map_err(err("parsing commit"))?;
    let mut fetched = false;
    if repo.find_commit(oid).is_err() {
        fetch_origin(&repo, &["+refs/heads/*:refs/remotes/origin/*"])?;
        fetched = true;
    }
    let target = repo.find_commit(oid).map_err(err(format!(
        "finding commit {commit} (not on any branch of origin?)"
    )))?;
    let mut opts = CheckoutBuilder::new();
    opts.force().remove_untracked(true).remove_ignored(true);
    repo.checkout_tree(target.as_object(), Some(&mut opts))
        .map_err(err(format!("checking out {commit}")))?;
    repo.set_head_detached(oid)
        .map_err(err(format!("moving HEAD to {commit}")))?;
    Ok(Checkout { fetched })
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
        checkout(&runner, &c3).unwrap();
        assert!(runner.join("c.txt").exists());
        std::fs::write(runner.join("junk.pyc"), "x").unwrap();
        std::fs::create_dir(runner.join("__pycache__")).unwrap();
        std::fs::write(runner.join("__pycache__/m.pyc"), "x").unwrap();
        let co = checkout(&runner, &c1).unwrap();
        assert!(!co.fetched);
        assert!(!runner.join("c.txt").exists());
        assert!(!runner.join("junk.pyc").exists());
        assert!(!runner.join("__pycache__").exists());
        assert!(runner.join("a.txt").exists());

        // A commit the runner has never seen is fetched.
        let c4 = commit(&master, "d.txt", "4");
        assert!(checkout(&runner, &c4).unwrap().fetched);
        assert!(runner.join("d.txt").exists());
    }

    #[test]
    fn unknown_commit_and_missing_repo_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let e = checkout(tmp.path(), &CommitId::parse(&"a".repeat(40)).unwrap()).unwrap_err();
        assert!(e.to_string().contains("opening repository"), "{e}");
    }
}
