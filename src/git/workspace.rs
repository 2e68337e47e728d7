//! The runner's clone, made exactly a commit before every job: what
//! `git checkout --force --detach SHA && git clean -ffdx` gives (plus
//! `git submodule update --init --recursive` when the commit has submodules), with HEAD
//! detached at the commit, the index matching its tree and every object readable through
//! the clone itself.
//!
//! The runner owns its clone, and a job may leave anything behind. Before each checkout
//! the cheap things a step can break are put back without asking git (a garbled `HEAD`,
//! stale `*.lock` files, the clone's config, hooks and the `info/` files that steer a
//! checkout, index entries flagged to be skipped). If git still fails, a deeper repair
//! follows (permissions of every directory, every lock file, the index rebuilt), and if
//! that fails too the clone is cloned again from its origin. Only a failure to reach the
//! origin, or a clone that cannot be rebuilt, ends a job without running it — and that is
//! the infrastructure's failure, never the commit's.
//!
//! A local origin's objects are borrowed (`objects/info/alternates`, what
//! `git clone --shared` sets up), so a new commit needs no fetch. The alternate names
//! origin's object directory, which repacks keep; a commit that origin later prunes is
//! fetched again, or the clone rebuilt, when a job needs it.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use git2::Oid;
use tinyci_proto::CommitId;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::clone::{Clone, Origin};
use super::command::{FetchLimits, Git};
use super::{GitError, GitErrorKind};

/// How the runner may treat the clone it is given.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceOptions {
    /// Take a clone with uncommitted changes or untracked files (they are deleted).
    pub discard_changes: bool,
    /// Deadlines of every fetch.
    pub limits: FetchLimits,
}

/// What [`Workspace::prepare`] did.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// Whether the commit had to be fetched.
    pub fetched: bool,
    /// What had to be repaired first, in words for the job's log (empty when nothing).
    pub repairs: Vec<String>,
    /// How long each phase took, in order (`heal`, `fetch`, `sweep`, `checkout`,
    /// `objects`: the wait for the commit's objects to be linked after the checkout).
    pub phases: Vec<(&'static str, Duration)>,
}

/// A file in `.git` that marks a clone as the runner's own: it was checked for a person's
/// work once, and from then on it is reset and cleaned without asking.
const OWNED_MARKER: &str = "tinyci-runner";

/// Files under `.git` that steer a checkout and that a step may change; each job starts
/// with them as the last checkout left them.
const CONTROL_FILES: &[&str] = &[
    "config",
    "objects/info/alternates",
    "info/attributes",
    "info/sparse-checkout",
    "info/grafts",
    // Made by a step, these would make the clone shallow, or have git read another
    // repository's config and refs.
    "shallow",
    "commondir",
];

/// Entries under `.git` that must be plain files when present: a step may leave a
/// directory or a FIFO there (reading a FIFO blocks for ever). Anything else is removed
/// before the job, and rebuilt from what the runner kept or by git.
const PLAIN_FILES: &[&str] = &[
    "HEAD",
    "config",
    "index",
    "packed-refs",
    "shallow",
    "commondir",
    "objects/info/alternates",
    "info/attributes",
    "info/sparse-checkout",
    "info/grafts",
    SECURED_FILE,
];

/// What a step's git may leave under `.git` that changes what the next commit's steps
/// see, and that the runner never makes itself: removed before each job. (`refs/replace`
/// swaps objects for others; a commit-graph is only a cache, and a garbled one fails
/// `git fsck`; the rest is an unfinished bisect.)
const LEFTOVERS: &[&str] = &[
    "refs/replace",
    "objects/info/commit-graph",
    "objects/info/commit-graphs",
    "BISECT_LOG",
    "BISECT_START",
    "BISECT_TERMS",
    "BISECT_EXPECTED_REV",
    "BISECT_ANCESTORS_OK",
    "BISECT_NAMES",
    "BISECT_RUN",
];

/// Lock files git leaves when it is killed; nothing of ours runs between jobs, so any
/// that exist are stale.
const TOP_LOCKS: &[&str] = &[
    "index.lock",
    "HEAD.lock",
    "config.lock",
    "packed-refs.lock",
    "shallow.lock",
];

/// Local operations (checkout, clean) get this long without output; they print nothing
/// while they work, so this is a bound on their whole run.
const LOCAL_LIMIT: Duration = Duration::from_secs(600);

/// The name of the directory a fresh clone is made in before it replaces a damaged one.
const RECLONE_DIR: &str = ".tinyci-reclone";

/// The runner's clone.
pub struct Workspace {
    clone: Clone,
    limits: FetchLimits,
    /// `.git/config` as it was when the runner took the clone: written into a fresh clone.
    start_config: Option<Vec<u8>>,
    /// The [`CONTROL_FILES`] as the last checkout left them (`None`: absent).
    control: Vec<(&'static str, Option<Vec<u8>>)>,
    /// The hooks directory as it was when the runner took the clone.
    hooks: Vec<(std::ffi::OsString, Vec<u8>, u32)>,
    /// The index file's identity after the last checkout; a different one was written by a
    /// step, and is checked for entries that a checkout would skip.
    index_stamp: Option<(u64, i64, i64, u64)>,
    /// What the last walk of the work tree saw (see [`sweep`]).
    sweep_cache: SweepCache,
    /// The commit the last successful prepare checked out.
    last: Option<CommitId>,
    /// Cancels background work when the workspace is dropped.
    stop: CancellationToken,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> GitError + '_ {
    move |e| {
        let kind = GitErrorKind::Io;
        GitError::new(what, e.to_string(), kind)
    }
}

/// Runs blocking file-system work off the async runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GitError> + Send + 'static,
) -> Result<T, GitError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| GitError::new("a blocking task", e.to_string(), GitErrorKind::Io))?
}

impl Workspace {
    /// Takes the clone at `path`: validates it (see [`Clone::open`]), locks it, refuses a
    /// person's working copy on first use unless `discard_changes`, and makes a local
    /// origin's objects readable in place. Blocking.
    pub fn open(path: &Path, options: WorkspaceOptions) -> Result<Workspace, GitError> {
        let clone = Clone::open(path)?;
        let marker = clone.git_dir.join(OWNED_MARKER);
        if !marker.exists() {
            if !options.discard_changes {
                refuse_if_dirty(&clone)?;
            }
            fs::write(
                &marker,
                "This clone belongs to a tinyci test_runner: it is reset and cleaned before every job.\n",
            )
            .map_err(io("marking the clone as the runner's"))?;
        }
        if let Origin::Local { objects, .. } = &clone.origin {
            borrow_objects(&clone.git_dir, objects)?;
        }
        let start_config = fs::read(clone.git_dir.join("config")).ok();
        let hooks = read_hooks(&clone.git_dir.join("hooks"));
        let mut ws = Workspace {
            limits: options.limits,
            start_config,
            control: Vec::new(),
            hooks,
            index_stamp: None,
            stop: CancellationToken::new(),
            last: None,
            sweep_cache: SweepCache::default(),
            clone,
        };
        ws.control = ws.read_control();
        Ok(ws)
    }

    /// The top of the clone's work tree.
    pub fn path(&self) -> &Path {
        &self.clone.path
    }

    /// The clone's origin.
    pub fn origin(&self) -> &Origin {
        &self.clone.origin
    }

    /// git for what may reach origin.
    fn git<'a>(&'a self, cancel: &'a CancellationToken, limits: FetchLimits) -> Git<'a> {
        Git {
            dir: &self.clone.path,
            limits,
            cancel,
            local: false,
        }
    }

    /// git for what only touches the clone (see [`Git::local`]).
    fn local<'a>(&'a self, cancel: &'a CancellationToken) -> Git<'a> {
        Git {
            dir: &self.clone.path,
            limits: FetchLimits {
                connect_timeout: LOCAL_LIMIT,
                stall_timeout: LOCAL_LIMIT,
            },
            cancel,
            local: true,
        }
    }

    /// Whether the origin answers (`git ls-remote`, bounded by the fetch limits).
    pub async fn probe_origin(&self, cancel: &CancellationToken) -> Result<(), GitError> {
        self.git(cancel, self.limits)
            .run(
                "reaching origin",
                GitErrorKind::Unreachable,
                ["ls-remote", "--heads", "origin"],
            )
            .await
            .map(|_| ())
    }

    /// Makes the clone exactly `commit` (see the module doc). An error means the job
    /// cannot run here now, and is never the commit's fault: its kind says whether the
    /// origin is unreachable, the commit is not on origin, or the clone is beyond repair.
    pub async fn prepare(
        &mut self,
        commit: &CommitId,
        cancel: &CancellationToken,
    ) -> Result<Prepared, GitError> {
        let mut done = Prepared::default();
        let started = Instant::now();
        // A step may remove the whole clone (`rm -rf $PWD`): git cannot even start in it.
        if !self.clone.path.is_dir() {
            fs::create_dir_all(&self.clone.path)
                .map_err(io("making the clone's directory again"))?;
        }
        // `.git` turned into a symlink by a step (to origin, say): git would write the
        // runner's checkout into whatever it points at. The link goes; the clone is made
        // again.
        let dot_git = self.clone.path.join(".git");
        if self.clone.git_dir == dot_git
            && fs::symlink_metadata(&dot_git).is_ok_and(|m| m.file_type().is_symlink())
        {
            fs::remove_file(&dot_git).map_err(io("removing a .git symlink a step left"))?;
        }
        if !self.clone.git_dir.is_dir() {
            self.reclone("its .git directory is gone", &mut done, cancel)
                .await?;
        } else if let Err(e) = self.heal(commit, &mut done).await {
            // Whatever a step did that the repairs cannot undo (a directory where a file
            // must be, a dangling objects symlink…): a fresh clone, rather than the same
            // error for every commit from now on.
            if e.kind == GitErrorKind::Cancelled {
                return Err(e);
            }
            self.reclone(&format!("repairing it failed: {e}"), &mut done, cancel)
                .await?;
        }
        done.phases.push(("heal", started.elapsed()));
        let started = Instant::now();
        let attributes_changed = match self.fetch_if_missing(commit, cancel).await {
            Ok((fetched, attrs)) => {
                done.fetched = fetched;
                attrs
            }
            Err(e) if e.kind == GitErrorKind::Damaged => {
                self.reclone(&e.to_string(), &mut done, cancel).await?;
                let (fetched, attrs) = self.fetch_if_missing(commit, cancel).await?;
                done.fetched = fetched;
                attrs
            }
            Err(e) => return Err(e),
        };
        done.phases.push(("fetch", started.elapsed()));
        // Copy the commit's borrowed objects into the clone while git checks it out: the
        // two only read objects, and on two cores the copy costs no wall time.
        let securing = match &self.clone.origin {
            Origin::Local { objects, .. } => Some(tokio::spawn(secure_objects(
                self.clone.path.clone(),
                objects.clone(),
                commit.clone(),
                self.stop.child_token(),
            ))),
            Origin::Remote { .. } => None,
        };
        if attributes_changed {
            // git does not rewrite a file whose content is unchanged when only the
            // attributes that apply to it changed; without an index it writes every file.
            let _ = fs::remove_file(self.clone.git_dir.join("index"));
        }
        // Unless the index is the one the last checkout wrote, a directory the walk has not
        // seen change may hold files the checkout will not remove: list them all.
        let index_now = stamp(&self.clone.git_dir.join("index"));
        let full = index_now.is_none() || index_now != self.index_stamp;
        // The walk below cleans against this commit, not against the index: until a
        // checkout of it succeeds, the next job lists every directory.
        self.index_stamp = None;
        let started = Instant::now();
        let cleaned = self.tidy(commit, full, &mut done).await?;
        done.phases.push(("sweep", started.elapsed()));
        let started = Instant::now();
        let mut checked_out = self.checkout(commit, !cleaned, cancel).await;
        if attributes_changed && checked_out.is_ok() {
            // Files written before their directory's new .gitattributes may have been
            // converted by the old one: once every .gitattributes on disk is the commit's,
            // write everything once more.
            let _ = fs::remove_file(self.clone.git_dir.join("index"));
            checked_out = self.checkout(commit, !cleaned, cancel).await;
        }
        done.phases.push(("checkout", started.elapsed()));
        if let Err(first) = checked_out {
            if first.kind == GitErrorKind::Cancelled || first.origin_unreachable() {
                return Err(first);
            }
            warn!(error = %first, "checkout failed; repairing the clone");
            done.repairs
                .push(format!("checkout failed ({first}); repaired the clone"));
            let (top, git_dir) = (self.clone.path.clone(), self.clone.git_dir.clone());
            let sha = commit.clone();
            blocking(move || deep_repair(&top, &git_dir, &sha)).await?;
            if let Err(second) = self.checkout(commit, true, cancel).await {
                if second.kind == GitErrorKind::Cancelled || second.origin_unreachable() {
                    return Err(second);
                }
                self.reclone(&second.to_string(), &mut done, cancel).await?;
                self.fetch_if_missing(commit, cancel).await?;
                self.checkout(commit, true, cancel).await.map_err(|e| {
                    GitError::new(
                        "checking out into a fresh clone",
                        e.to_string(),
                        if e.kind == GitErrorKind::Cancelled {
                            e.kind
                        } else {
                            GitErrorKind::Damaged
                        },
                    )
                })?;
            }
        }
        self.control = self.read_control();
        self.index_stamp = stamp(&self.clone.git_dir.join("index"));
        self.last = Some(commit.clone());
        let started = Instant::now();
        if let Some(task) = securing {
            tokio::select! {
                _ = task => {}
                _ = cancel.cancelled() => {
                    return Err(GitError::new("copying the commit's objects", "cancelled", GitErrorKind::Cancelled));
                }
            }
        }
        done.phases.push(("objects", started.elapsed()));
        Ok(done)
    }

    /// Puts back what a step may have broken under `.git` without running git: cheap
    /// enough for every job.
    async fn heal(&mut self, commit: &CommitId, done: &mut Prepared) -> Result<(), GitError> {
        let git_dir = self.clone.git_dir.clone();
        for rel in PLAIN_FILES {
            let p = git_dir.join(rel);
            let plain = match fs::metadata(&p) {
                Ok(m) => m.is_file(),
                Err(_) => true, // absent (or a dangling symlink): nothing to read
            };
            if !plain {
                remove_tree(&p).map_err(io(
                    "removing what a step left in place of a file under .git",
                ))?;
                done.repairs
                    .push(format!(".git/{rel} was not a plain file; removed it"));
            }
        }
        for rel in LEFTOVERS {
            let p = git_dir.join(rel);
            if fs::symlink_metadata(&p).is_ok() {
                remove_tree(&p).map_err(io("removing what a step's git left under .git"))?;
                done.repairs.push(format!("removed .git/{rel} a step left"));
            }
        }
        let head = git_dir.join("HEAD");
        let bytes = fs::read(&head).ok();
        let mut head_ok = bytes.as_deref().is_some_and(valid_head);
        // A step that wrote an id into HEAD: the object must exist, or the checkout would
        // leave a reflog entry naming it, which `git fsck` in the next commit's steps
        // reports (a good commit failing for an earlier one's doing).
        if let Some(moved) = bytes
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(|t| t.trim_end_matches('\n').to_owned())
            .filter(|t| head_ok && !t.starts_with("ref: "))
            .filter(|t| !self.last.as_ref().is_some_and(|l| l.as_str() == t))
        {
            let dir = git_dir.clone();
            head_ok = blocking(move || {
                Ok(git2::Repository::open(&dir)
                    .ok()
                    .zip(git2::Oid::from_str(&moved).ok())
                    .is_some_and(|(repo, oid)| repo.find_commit(oid).is_ok()))
            })
            .await?;
        }
        if !head_ok {
            // Back to what the index matches: the last commit we checked out.
            let at = self.last.as_ref().unwrap_or(commit);
            if self.last.is_none() {
                let _ = fs::remove_file(git_dir.join("index"));
            }
            fs::write(&head, format!("{at}\n")).map_err(io("rewriting HEAD"))?;
            done.repairs.push("HEAD was garbled; rewrote it".into());
        }
        for name in TOP_LOCKS {
            if fs::remove_file(git_dir.join(name)).is_ok() {
                done.repairs.push(format!("removed a stale .git/{name}"));
            }
        }
        for (rel, want) in &self.control {
            let p = git_dir.join(rel);
            let have = fs::read(&p).ok();
            if &have != want {
                match want {
                    Some(bytes) => {
                        if let Some(parent) = p.parent() {
                            let _ = fs::create_dir_all(parent);
                        }
                        fs::write(&p, bytes).map_err(io("restoring a file under .git"))?
                    }
                    None => fs::remove_file(&p).map_err(io("removing a file under .git"))?,
                }
                done.repairs
                    .push(format!(".git/{rel} was changed by a step; restored it"));
            }
        }
        if !same_hooks(&git_dir.join("hooks"), &self.hooks) {
            restore_hooks(&git_dir.join("hooks"), &self.hooks)?;
            done.repairs
                .push(".git/hooks was changed by a step; restored it".into());
        }
        let index = git_dir.join("index");
        let now = stamp(&index);
        if now.is_some() && now != self.index_stamp {
            let idx = index.clone();
            if blocking(move || Ok(index_has_skipped_entries(&idx))).await? {
                fs::remove_file(&index).map_err(io("removing the index"))?;
                done.repairs.push(
                    "the index had entries flagged assume-unchanged or skip-worktree; rebuilt it"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// Walks the work tree before the checkout (see [`sweep`]) and, when it can, removes
    /// what `git clean -ffdx` would after it. Returns whether it did: it does not on the
    /// first job (the work tree is not known yet), for a commit with submodules or a clone
    /// with a sparse checkout (git decides there what is tracked), or when the commit's
    /// trees cannot be read; `git clean` runs after the checkout then.
    async fn tidy(
        &mut self,
        commit: &CommitId,
        full: bool,
        done: &mut Prepared,
    ) -> Result<bool, GitError> {
        let top = self.clone.path.clone();
        let sha = commit.clone();
        let first = self.sweep_cache.since.is_none();
        let mut cache = std::mem::take(&mut self.sweep_cache);
        let (swept, cache) = blocking(move || {
            let repo = if first { None } else { super::open(&top).ok() };
            let target = repo.as_ref().and_then(|repo| {
                let sparse = repo.config().is_ok_and(|c| {
                    c.get_bool("core.sparseCheckout").unwrap_or(false)
                        || c.get_bool("index.sparse").unwrap_or(false)
                });
                let root = Oid::from_str(sha.as_str())
                    .and_then(|oid| repo.find_commit(oid))
                    .and_then(|c| c.tree())
                    .ok()?;
                let modules = root.get_name(".gitmodules").is_some();
                (!sparse && !modules).then_some(Target { repo, root })
            });
            let swept = sweep(&top, &mut cache, target.as_ref(), full);
            Ok((swept, cache))
        })
        .await?;
        self.sweep_cache = cache;
        if swept.special > 0 {
            done.repairs.push(format!(
                "removed {} FIFO(s), socket(s) or device(s) a step left",
                swept.special
            ));
        }
        if swept.chmodded > 0 {
            done.repairs.push(format!(
                "gave {} directorie(s) a step had locked their owner's access back",
                swept.chmodded
            ));
        }
        Ok(swept.clean)
    }

    /// Fetches from origin unless the commit is already readable. Returns whether it
    /// fetched and whether the commit's attributes differ (see [`Workspace::inspect`]).
    async fn fetch_if_missing(
        &self,
        commit: &CommitId,
        cancel: &CancellationToken,
    ) -> Result<(bool, bool), GitError> {
        if let Some(attrs) = self.inspect(commit).await? {
            return Ok((false, attrs));
        }
        let git = self.git(cancel, self.limits);
        let fetch = |extra: &'static [&'static str]| {
            let mut args = vec![
                "fetch",
                "--quiet",
                "--progress",
                "--force",
                "--no-write-fetch-head",
                "--no-recurse-submodules",
                "origin",
            ];
            args.extend_from_slice(extra);
            args
        };
        git.run(
            "fetching from origin",
            GitErrorKind::Unreachable,
            fetch(&[
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ]),
        )
        .await?;
        if let Some(attrs) = self.inspect(commit).await? {
            return Ok((true, attrs));
        }
        // Not on any branch or tag: ask for the commit itself (servers allow it when it is
        // reachable from any of their refs, e.g. a pull request's).
        let by_id = git
            .run(
                "fetching the commit by id",
                GitErrorKind::NotFound,
                [
                    "fetch",
                    "--quiet",
                    "--progress",
                    "--no-write-fetch-head",
                    "--no-recurse-submodules",
                    "origin",
                    commit.as_str(),
                ],
            )
            .await;
        let present = match by_id {
            Ok(_) => self.inspect(commit).await?,
            Err(e) if e.kind != GitErrorKind::NotFound => return Err(e),
            Err(_) => None,
        };
        match present {
            Some(attrs) => Ok((true, attrs)),
            None => Err(GitError::new(
                format!("fetching {commit}"),
                "origin has no such commit on any branch or tag",
                GitErrorKind::NotFound,
            )),
        }
    }

    /// Whether `commit` can be read through the clone (its objects or its alternates):
    /// `None` if not; else whether its `.gitattributes` differ from those the work tree
    /// was last written with — the last commit we checked out, and HEAD if a step moved
    /// it (only subtrees whose ids differ are visited). One open of the repository for both.
    async fn inspect(&self, commit: &CommitId) -> Result<Option<bool>, GitError> {
        let path = self.clone.path.clone();
        let sha = commit.clone();
        let last = self.last.clone();
        blocking(move || {
            let repo = super::open(&path)?;
            let tree_of = |c: &CommitId| {
                Oid::from_str(c.as_str())
                    .and_then(|oid| repo.find_commit(oid))
                    .and_then(|c| c.tree())
            };
            let Ok(target) = tree_of(&sha) else {
                return Ok(None);
            };
            let mut written = vec![repo.head().and_then(|h| h.peel_to_tree())];
            if let Some(last) = &last {
                written.push(tree_of(last));
            }
            let differ = written.iter().any(|t| match t {
                Ok(t) => attributes_differ(&repo, Some(t), Some(&target)),
                // Unreadable: we cannot tell what the files were written with.
                Err(_) => true,
            });
            Ok(Some(differ))
        })
        .await
    }

    /// `git checkout --force --detach` + `git clean -ffdx` (unless `clean` is false: the
    /// walk before did its work), and the same for submodules.
    async fn checkout(
        &self,
        commit: &CommitId,
        clean: bool,
        cancel: &CancellationToken,
    ) -> Result<(), GitError> {
        let git = self.local(cancel);
        git.run(
            &format!("checking out {commit}"),
            GitErrorKind::Damaged,
            [
                "checkout",
                "--quiet",
                "--force",
                "--detach",
                "--no-recurse-submodules",
                commit.as_str(),
            ],
        )
        .await?;
        if clean {
            git.run(
                "cleaning the work tree",
                GitErrorKind::Damaged,
                ["clean", "-ffdxq"],
            )
            .await?;
        }
        let has_modules =
            fs::symlink_metadata(self.clone.path.join(".gitmodules")).is_ok_and(|m| m.is_file());
        if has_modules {
            // A submodule's URL may be a path on this machine; git refuses the `file`
            // transport for submodules by default since 2.38, but the commit under test
            // runs its own code on this runner anyway, so it gains nothing from it.
            let allow = ["-c", "protocol.file.allow=always"];
            git.run(
                "syncing submodule URLs",
                GitErrorKind::Damaged,
                allow
                    .iter()
                    .copied()
                    .chain(["submodule", "sync", "--quiet", "--recursive"]),
            )
            .await?;
            self.git(cancel, self.limits)
                .run(
                    "updating submodules",
                    GitErrorKind::Unreachable,
                    allow.iter().copied().chain([
                        "submodule",
                        "update",
                        "--init",
                        "--recursive",
                        "--force",
                        "--checkout",
                        "--progress",
                    ]),
                )
                .await?;
            git.run(
                "cleaning submodules",
                GitErrorKind::Damaged,
                [
                    "submodule",
                    "foreach",
                    "--quiet",
                    "--recursive",
                    "git clean -ffdxq",
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Replaces the clone's `.git` with a fresh clone from origin.
    async fn reclone(
        &mut self,
        why: &str,
        done: &mut Prepared,
        cancel: &CancellationToken,
    ) -> Result<(), GitError> {
        warn!(
            reason = why,
            origin = self.clone.origin.url(),
            "the clone is damaged; cloning it again from origin"
        );
        done.repairs.push(format!(
            "the clone was damaged ({why}); cloned it again from origin"
        ));
        let top = self.clone.path.clone();
        let tmp = top.join(RECLONE_DIR);
        {
            let (top, tmp) = (top.clone(), tmp.clone());
            blocking(move || {
                make_writable(&top);
                remove_tree(&tmp).map_err(io("removing an old fresh clone"))
            })
            .await?;
        }
        let mut args: Vec<String> = vec![
            "clone".into(),
            "--quiet".into(),
            "--progress".into(),
            "--no-checkout".into(),
        ];
        if matches!(self.clone.origin, Origin::Local { .. }) {
            args.push("--shared".into());
        }
        args.push("--".into());
        args.push(self.clone.origin.url().to_owned());
        args.push(RECLONE_DIR.into());
        self.git(cancel, self.limits)
            .run(
                "cloning again from origin",
                GitErrorKind::Unreachable,
                &args,
            )
            .await?;
        let git_dir = self.clone.git_dir.clone();
        let config = self.start_config.clone();
        let hooks = self.hooks.clone();
        blocking(move || {
            let old = top.join(".tinyci-old-git");
            remove_tree(&old).map_err(io("removing an old .git"))?;
            if fs::symlink_metadata(&git_dir).is_ok() {
                fs::rename(&git_dir, &old).map_err(io("moving the damaged .git aside"))?;
            }
            fs::rename(tmp.join(".git"), &git_dir).map_err(io("moving the fresh .git in"))?;
            remove_tree(&tmp).map_err(io("removing the fresh clone's directory"))?;
            remove_tree(&old).map_err(io("removing the damaged .git"))?;
            if let Some(config) = config {
                fs::write(git_dir.join("config"), config).map_err(io("restoring .git/config"))?;
            }
            restore_hooks(&git_dir.join("hooks"), &hooks)?;
            fs::write(
                git_dir.join(OWNED_MARKER),
                "This clone belongs to a tinyci test_runner.\n",
            )
            .map_err(io("marking the clone"))?;
            Ok(())
        })
        .await?;
        if let Origin::Local { objects, .. } = &self.clone.origin {
            borrow_objects(&self.clone.git_dir, objects)?;
        }
        self.index_stamp = None;
        info!("cloned again from origin");
        Ok(())
    }

    fn read_control(&self) -> Vec<(&'static str, Option<Vec<u8>>)> {
        CONTROL_FILES
            .iter()
            .map(|rel| (*rel, fs::read(self.clone.git_dir.join(rel)).ok()))
            .collect()
    }
}

/// Refuses a clone with uncommitted changes or untracked (or ignored) files: the runner
/// would delete them, and on first use they are more likely a person's work than ours.
fn refuse_if_dirty(clone: &Clone) -> Result<(), GitError> {
    let out = std::process::Command::new("git")
        .args(["status", "--porcelain", "--ignored"])
        .current_dir(&clone.path)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io("running git status"))?;
    let what = format!("cannot use {} as the clone", clone.path.display());
    if !out.status.success() {
        return Err(GitError::new(
            what,
            format!(
                "git status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            GitErrorKind::Usage,
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let changes: Vec<&str> = text.lines().collect();
    if changes.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = changes.iter().take(3).map(|l| l.trim()).collect();
    Err(GitError::new(
        what,
        format!(
            "it has {} uncommitted change(s) or untracked file(s) ({}{}); the runner resets and cleans its clone before every job, which would delete them. Give the runner a clone of its own (`git clone ORIGIN DIR`), or pass --discard-changes to let it discard them",
            changes.len(),
            shown.join(", "),
            if changes.len() > 3 { ", …" } else { "" }
        ),
        GitErrorKind::Usage,
    ))
}

/// Makes origin's object directory an alternate of the clone (what `git clone --shared`
/// does), so every commit of origin can be read through the clone without a fetch.
fn borrow_objects(git_dir: &Path, objects: &Path) -> Result<(), GitError> {
    let file = git_dir.join("objects/info/alternates");
    let text = fs::read_to_string(&file).unwrap_or_default();
    let line = objects.to_string_lossy();
    if text.lines().any(|l| l.trim() == line) {
        return Ok(());
    }
    if let Some(parent) = file.parent() {
        fs::create_dir_all(parent).map_err(io("creating objects/info"))?;
    }
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&line);
    new.push('\n');
    fs::write(&file, new).map_err(io("writing objects/info/alternates"))
}

/// Whether `HEAD`'s bytes are a symbolic ref or an object id, as git requires.
fn valid_head(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let t = text.trim_end_matches('\n');
    if let Some(r) = t.strip_prefix("ref: ") {
        return r.starts_with("refs/") && !r.contains(char::is_whitespace);
    }
    (t.len() == 40 || t.len() == 64) && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file's identity and last change, to tell whether someone rewrote it.
fn stamp(path: &Path) -> Option<(u64, i64, i64, u64)> {
    fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

/// Whether the index has entries a checkout would leave alone (assume-unchanged,
/// skip-worktree, intent-to-add), or cannot be read at all.
fn index_has_skipped_entries(path: &Path) -> bool {
    const ASSUME_VALID: u16 = 0x8000;
    const SKIP_WORKTREE: u16 = 0x4000;
    const INTENT_TO_ADD: u16 = 0x2000;
    match git2::Index::open(path) {
        Ok(index) => index.iter().any(|e| {
            e.flags & ASSUME_VALID != 0 || e.flags_extended & (SKIP_WORKTREE | INTENT_TO_ADD) != 0
        }),
        Err(_) => true,
    }
}

/// The hooks directory's regular files: name, bytes, mode.
fn read_hooks(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>, u32)> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            let bytes = if md.is_file() {
                fs::read(e.path()).unwrap_or_default()
            } else {
                Vec::new()
            };
            out.push((e.file_name(), bytes, md.mode()));
        }
    }
    out.sort();
    out
}

/// Whether the hooks directory still holds exactly `hooks` (names, sizes and modes: a
/// stat per hook, no reads, so it is cheap enough for every job).
fn same_hooks(dir: &Path, hooks: &[(std::ffi::OsString, Vec<u8>, u32)]) -> bool {
    let Ok(rd) = fs::read_dir(dir) else {
        return hooks.is_empty();
    };
    let mut seen = 0;
    for e in rd.flatten() {
        seen += 1;
        let Ok(md) = fs::symlink_metadata(e.path()) else {
            return false;
        };
        let name = e.file_name();
        let Some((_, bytes, mode)) = hooks.iter().find(|(n, _, _)| *n == name) else {
            return false;
        };
        if md.mode() != *mode || (md.is_file() && md.len() != bytes.len() as u64) {
            return false;
        }
    }
    seen == hooks.len()
}

fn restore_hooks(dir: &Path, hooks: &[(std::ffi::OsString, Vec<u8>, u32)]) -> Result<(), GitError> {
    make_writable(dir);
    remove_tree(dir).map_err(io("removing .git/hooks"))?;
    fs::create_dir_all(dir).map_err(io("creating .git/hooks"))?;
    for (name, bytes, mode) in hooks {
        let p = dir.join(name);
        fs::write(&p, bytes).map_err(io("restoring a hook"))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(io("restoring a hook's mode"))?;
    }
    Ok(())
}

/// The repair git cannot do itself: every directory of the clone made readable and
/// writable by its owner again (a step may `chmod 000` one, which stops `git clean`), every
/// stale lock file under `.git` removed, HEAD pointed at the commit and the index dropped,
/// so the next checkout rebuilds it from the work tree.
fn deep_repair(top: &Path, git_dir: &Path, commit: &CommitId) -> Result<(), GitError> {
    make_writable(top);
    remove_locks(git_dir);
    let _ = fs::remove_file(git_dir.join("index"));
    fs::write(git_dir.join("HEAD"), format!("{commit}\n")).map_err(io("rewriting HEAD"))?;
    Ok(())
}

/// Gives the owner rwx on `dir` and every directory below it (symlinks not followed).
fn make_writable(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(md) = fs::symlink_metadata(&d) {
            if !md.is_dir() {
                continue;
            }
            if md.mode() & 0o700 != 0o700 {
                let _ = fs::set_permissions(
                    &d,
                    fs::Permissions::from_mode((md.mode() | 0o700) & 0o7777),
                );
            }
        }
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// Removes every `*.lock` file under `.git` except in the object store.
fn remove_locks(git_dir: &Path) {
    let mut stack: Vec<PathBuf> = vec![git_dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() && e.file_name() != "objects" => stack.push(p),
                Ok(t) if !t.is_dir() && p.extension().is_some_and(|x| x == "lock") => {
                    let _ = fs::remove_file(&p);
                }
                _ => {}
            }
        }
    }
}

/// `rm -rf`, after giving the owner access to every directory below.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            make_writable(path);
            fs::remove_dir_all(path)
        }
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the `.gitattributes` files of two trees differ, at any depth.
fn attributes_differ(
    repo: &git2::Repository,
    a: Option<&git2::Tree<'_>>,
    b: Option<&git2::Tree<'_>>,
) -> bool {
    let attrs = |t: Option<&git2::Tree<'_>>| {
        t.and_then(|t| t.get_name(".gitattributes"))
            .map(|e| (e.id(), e.filemode()))
    };
    if attrs(a) != attrs(b) {
        return true;
    }
    let subtrees = |t: Option<&git2::Tree<'_>>| -> Vec<(Vec<u8>, Oid)> {
        t.map(|t| {
            t.iter()
                .filter(|e| e.kind() == Some(git2::ObjectType::Tree))
                .map(|e| (e.name_bytes().to_vec(), e.id()))
                .collect()
        })
        .unwrap_or_default()
    };
    let (sa, sb) = (subtrees(a), subtrees(b));
    let mut names: Vec<&Vec<u8>> = sa.iter().chain(sb.iter()).map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    names.into_iter().any(|name| {
        let ia = sa.iter().find(|(n, _)| n == name).map(|(_, id)| *id);
        let ib = sb.iter().find(|(n, _)| n == name).map(|(_, id)| *id);
        if ia == ib {
            return false;
        }
        let ta = ia.and_then(|id| repo.find_tree(id).ok());
        let tb = ib.and_then(|id| repo.find_tree(id).ok());
        attributes_differ(repo, ta.as_ref(), tb.as_ref())
    })
}

/// The file in `.git` naming the last commit whose objects were linked into the clone.
const SECURED_FILE: &str = "tinyci-secured";

/// Makes the objects of `commit` that the clone borrows from its local origin its own, so
/// the checkout stays readable even if origin later prunes the commit (a force-push and a
/// `gc`): each object `git rev-list --objects COMMIT ^LAST` names (LAST: the commit this
/// was last done for) that origin holds loose is hard-linked into the clone's object
/// directory, and origin's packs (immutable files) are hard-linked into its pack
/// directory; a link keeps the data when origin deletes its name. Copies where links are
/// impossible (another file system). Runs beside the checkout.
async fn secure_objects(top: PathBuf, origin: PathBuf, commit: CommitId, stop: CancellationToken) {
    let git_dir = top.join(".git");
    let last = fs::read_to_string(git_dir.join(SECURED_FILE))
        .ok()
        .and_then(|t| CommitId::parse(t.trim()).ok());
    if last.as_ref() == Some(&commit) {
        return;
    }
    let git = Git {
        dir: &top,
        limits: FetchLimits {
            connect_timeout: LOCAL_LIMIT,
            stall_timeout: LOCAL_LIMIT,
        },
        cancel: &stop,
        local: true,
    };
    let list = |input: String| {
        let git = &git;
        async move {
            git.run_with_input(
                "listing the commit's objects",
                GitErrorKind::Io,
                ["rev-list", "--objects", "--stdin"],
                Some(input.as_bytes()),
            )
            .await
        }
    };
    let mut listed = match &last {
        Some(last) => list(format!("{commit}\n^{last}\n")).await,
        None => list(format!("{commit}\n")).await,
    };
    if listed.is_err() && last.is_some() && !stop.is_cancelled() {
        // The last commit is gone (the clone was cloned again): take everything.
        listed = list(format!("{commit}\n")).await;
    }
    let listed = match listed {
        Ok(out) => out,
        Err(e) => {
            if !stop.is_cancelled() {
                warn!(error = %e, "cannot list the commit's objects; the clone still borrows them from origin");
            }
            return;
        }
    };
    let ours = git_dir.join("objects");
    let done = blocking(move || {
        let mut packed = false;
        for line in listed.split(|b| *b == b'\n') {
            let Some(hex) = line.get(..40).and_then(|h| std::str::from_utf8(h).ok()) else {
                continue;
            };
            let (dir, rest) = hex.split_at(2);
            let target = ours.join(dir).join(rest);
            if fs::symlink_metadata(&target).is_ok() {
                continue;
            }
            let loose = origin.join(dir).join(rest);
            if fs::symlink_metadata(&loose).is_err() {
                packed = true;
                continue;
            }
            fs::create_dir_all(ours.join(dir)).map_err(io("creating an object directory"))?;
            link_or_copy(&loose, &target)?;
        }
        if packed {
            let pack_dir = ours.join("pack");
            fs::create_dir_all(&pack_dir).map_err(io("creating the pack directory"))?;
            let mut names: Vec<PathBuf> = fs::read_dir(origin.join("pack"))
                .map_err(io("listing origin's packs"))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pack" || x == "idx"))
                .collect();
            // A pack is used once its .idx exists: link every .pack before its .idx.
            names.sort_by_key(|p| p.extension().is_some_and(|x| x == "idx"));
            for from in names {
                let Some(name) = from.file_name() else {
                    continue;
                };
                let to = pack_dir.join(name);
                if fs::symlink_metadata(&to).is_err() {
                    link_or_copy(&from, &to)?;
                }
            }
        }
        Ok(())
    })
    .await;
    match done {
        Ok(()) => {
            let _ = fs::write(git_dir.join(SECURED_FILE), format!("{commit}\n"));
        }
        Err(e) => {
            warn!(error = %e, "cannot link the commit's objects; the clone still borrows them from origin")
        }
    }
}

/// A hard link from `from` to `to`, or a copy (through a temporary name) when the two are
/// on different file systems. A file that vanished meanwhile is skipped.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), GitError> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == std::io::ErrorKind::AlreadyExists
                || e.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(_) => {
            let tmp = to.with_extension("tinyci-tmp");
            match fs::copy(from, &tmp) {
                Ok(_) => fs::rename(&tmp, to).map_err(io("placing a copied object")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    Err(io("copying an object")(e))
                }
            }
        }
    }
}

/// What [`sweep`] changed.
#[derive(Debug, Default)]
struct Swept {
    special: usize,
    chmodded: usize,
    /// Entries removed because the commit does not have them.
    cleaned: usize,
    /// Whether the walk removed everything the commit does not have, so that
    /// `git clean` has nothing left to do.
    clean: bool,
}

/// The subdirectories of every directory at the last walk, and a time before which a
/// directory's ctime says its entries have not changed since.
#[derive(Debug, Default)]
struct SweepCache {
    since: Option<SystemTime>,
    subdirs: HashMap<PathBuf, Vec<PathBuf>>,
}

/// The kernel stamps ctime from a coarse clock; this much slack keeps a change made just
/// after a walk began from looking older than the walk.
const CTIME_SLACK: Duration = Duration::from_millis(100);

/// The commit a walk cleans against: after `git checkout --force SHA && git clean -ffdx`
/// the work tree holds exactly the entries of its tree (no submodules, no sparse checkout:
/// see [`Workspace::tidy`]).
struct Target<'r> {
    repo: &'r git2::Repository,
    root: git2::Tree<'r>,
}

/// What the commit has at a directory's path.
enum At<'r> {
    /// A directory: its tree.
    Tree(git2::Tree<'r>),
    /// Nothing, or something that is not a directory.
    Not,
    /// A tree object cannot be read: nothing may be removed on its word.
    Unknown,
}

impl<'r> Target<'r> {
    /// The commit's entry at `rel` (relative to the top of the work tree), walked one
    /// component at a time, so a missing path and an unreadable tree are told apart.
    fn at(&self, rel: &Path) -> At<'r> {
        let mut tree = self.root.clone();
        for part in rel.iter() {
            let id = match tree.get_name_bytes(part.as_encoded_bytes()) {
                Some(entry) if entry.kind() == Some(git2::ObjectType::Tree) => entry.id(),
                _ => return At::Not,
            };
            match self.repo.find_tree(id) {
                Ok(t) => tree = t,
                Err(_) => return At::Unknown,
            }
        }
        At::Tree(tree)
    }
}

/// Removes a file, a symlink or a whole directory (after giving its owner access).
fn remove_entry(path: &Path, is_dir: bool) -> bool {
    if is_dir {
        remove_tree(path).is_ok()
    } else {
        fs::remove_file(path).is_ok()
    }
}

/// Walks the work tree (not `.git`): removes FIFOs, sockets and device files, which git
/// neither tracks nor cleans, and gives the owner back rwx on any directory a step took
/// it from (git cannot clean or check out into those when not running as root). With a
/// `target`, it also removes every entry the commit does not have — what
/// `git clean -ffdx` after the checkout would remove (untracked and ignored files and
/// directories, nested repositories) — and every directory where the commit has a file
/// (`git checkout --force` would remove it), so no `git clean` process is needed.
///
/// Only directories whose ctime moved since the last walk are listed again (a new entry,
/// a removed one or a mode change moves it); the others are known by their subdirectories
/// from the cache, so a warm walk costs one `lstat` per directory. This is exact for the
/// clean too as long as the index is the one the last checkout wrote: an unchanged
/// directory then holds only entries of that index, which the checkout itself removes or
/// keeps. Otherwise the caller asks for a `full` walk, which lists every directory.
fn sweep(top: &Path, cache: &mut SweepCache, target: Option<&Target<'_>>, full: bool) -> Swept {
    use std::os::unix::fs::FileTypeExt;
    let started = SystemTime::now();
    let mut out = Swept {
        clean: target.is_some(),
        ..Swept::default()
    };
    let mut seen: HashMap<PathBuf, Vec<PathBuf>> = HashMap::with_capacity(cache.subdirs.len());
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&d) else {
            continue;
        };
        if !md.is_dir() {
            continue;
        }
        let mut unchanged = !full && cache.since.is_some_and(|since| ctime(&md) < since);
        if md.mode() & 0o700 != 0o700 {
            let mode = (md.mode() | 0o700) & 0o7777;
            if fs::set_permissions(&d, fs::Permissions::from_mode(mode)).is_ok() {
                out.chmodded += 1;
            }
            unchanged = false;
        }
        let known = if unchanged {
            cache.subdirs.remove(&d)
        } else {
            None
        };
        let subdirs = match known {
            Some(v) => v,
            None => {
                let tree = match target.filter(|_| out.clean) {
                    None => None,
                    Some(t) => match t.at(d.strip_prefix(top).unwrap_or(Path::new(""))) {
                        At::Tree(tree) => Some(tree),
                        At::Not => {
                            // A directory the commit does not have at all.
                            if remove_entry(&d, true) {
                                out.cleaned += 1;
                            } else {
                                out.clean = false;
                            }
                            continue;
                        }
                        At::Unknown => {
                            out.clean = false;
                            None
                        }
                    },
                };
                let mut v = Vec::new();
                if let Ok(rd) = fs::read_dir(&d) {
                    for e in rd.flatten() {
                        let Ok(t) = e.file_type() else {
                            out.clean = false;
                            continue;
                        };
                        let name = e.file_name();
                        if d == top && name == ".git" {
                            continue;
                        }
                        if t.is_fifo() || t.is_socket() || t.is_block_device() || t.is_char_device()
                        {
                            if fs::remove_file(e.path()).is_ok() {
                                out.special += 1;
                            } else {
                                out.clean = false;
                            }
                            continue;
                        }
                        let Some(tree) = &tree else {
                            if t.is_dir() {
                                v.push(e.path());
                            }
                            continue;
                        };
                        let keep = match tree.get_name_bytes(name.as_encoded_bytes()) {
                            None => false,
                            // A directory goes on where the commit has one; anything else
                            // there is git's to replace.
                            Some(entry) if entry.kind() == Some(git2::ObjectType::Tree) => {
                                if t.is_dir() {
                                    v.push(e.path());
                                }
                                true
                            }
                            // A submodule's directory is not git clean's either.
                            Some(entry) if entry.kind() == Some(git2::ObjectType::Commit) => true,
                            Some(_) => !t.is_dir(),
                        };
                        if !keep {
                            if remove_entry(&e.path(), t.is_dir()) {
                                out.cleaned += 1;
                            } else {
                                out.clean = false;
                            }
                        }
                    }
                } else {
                    out.clean = false;
                }
                v
            }
        };
        stack.extend(subdirs.iter().cloned());
        seen.insert(d, subdirs);
    }
    cache.subdirs = seen;
    cache.since = Some(started - CTIME_SLACK);
    out
}

fn ctime(md: &fs::Metadata) -> SystemTime {
    UNIX_EPOCH
        + Duration::new(
            md.ctime().max(0) as u64,
            md.ctime_nsec().clamp(0, 999_999_999) as u32,
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::tests::{commit, git};
    use std::os::unix::fs::symlink;

    fn options() -> WorkspaceOptions {
        WorkspaceOptions::default()
    }

    /// A master repo with one commit and a runner clone of it.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, CommitId) {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("master");
        fs::create_dir(&m).unwrap();
        git(&m, &["init", "-q"]);
        let c1 = commit(&m, "a.txt", "a");
        git(tmp.path(), &["clone", "-q", "master", "runner"]);
        let r = tmp.path().join("runner");
        (tmp, m, r, c1)
    }

    fn assert_exact(clone: &Path, c: &CommitId) {
        assert_eq!(git(clone, &["rev-parse", "HEAD"]), c.as_str());
        assert_eq!(git(clone, &["status", "--porcelain", "--ignored"]), "");
        let head = fs::read_to_string(clone.join(".git/HEAD")).unwrap();
        assert_eq!(head.trim(), c.as_str(), "HEAD is detached at the commit");
    }

    #[tokio::test]
    async fn checkout_is_exact_and_readable_by_git_in_the_clone() {
        let (_tmp, m, r, c1) = setup();
        let cancel = CancellationToken::new();
        let mut ws = Workspace::open(&r, options()).unwrap();
        let c2 = commit(&m, "dir/b.txt", "b");
        let p = ws.prepare(&c2, &cancel).await.unwrap();
        assert!(
            !p.fetched,
            "a local origin's objects are borrowed, not fetched"
        );
        assert!(p.repairs.is_empty(), "{:?}", p.repairs);
        assert_exact(&r, &c2);
        // git in the clone sees the commit and its history through the alternate.
        assert_eq!(git(&r, &["log", "--format=%H"]).lines().count(), 2);
        git(&r, &["describe", "--always"]);
        git(&r, &["diff", "--quiet", "HEAD"]);
        // Junk of every kind, then back to c1.
        fs::write(r.join("junk.pyc"), "x").unwrap();
        fs::create_dir_all(r.join("build/deep")).unwrap();
        fs::write(r.join("a.txt"), "changed").unwrap();
        fs::remove_file(r.join("dir/b.txt")).unwrap();
        nix_mkfifo(&r.join("dir/b.txt"));
        symlink("/etc", r.join("etc-link")).unwrap();
        fs::write(r.join(".git/index.lock"), "").unwrap();
        let p = ws.prepare(&c1, &cancel).await.unwrap();
        assert!(
            p.repairs.iter().any(|x| x.contains("index.lock")),
            "{:?}",
            p.repairs
        );
        assert_exact(&r, &c1);
        assert!(!r.join("dir").exists());
    }

    #[tokio::test]
    async fn the_walk_cleans_what_git_clean_would_in_directories_it_saw_change() {
        use std::os::unix::ffi::OsStrExt;
        let (_tmp, m, r, _c1) = setup();
        fs::write(m.join(".gitignore"), "*.o\n").unwrap();
        commit(&m, "d/e/kept.txt", "kept");
        let c2 = commit(&m, "d/file-or-dir", "a file");
        let cancel = CancellationToken::new();
        let mut ws = Workspace::open(&r, options()).unwrap();
        ws.prepare(&c2, &cancel).await.unwrap();
        assert!(
            ws.sweep_cache.since.is_some(),
            "the first walk fills the cache"
        );
        // Junk of every kind, deep in tracked directories and at the top.
        let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.tmp");
        fs::write(r.join("d/e").join(odd), "x").unwrap();
        fs::write(r.join("d/e/x.o"), "ignored").unwrap();
        fs::create_dir_all(r.join("nested/.git/objects")).unwrap();
        fs::write(r.join("nested/.git/HEAD"), "ref: refs/heads/x\n").unwrap();
        fs::create_dir_all(r.join("d/untracked/deeper")).unwrap();
        fs::write(r.join("d/untracked/deeper/f"), "x").unwrap();
        fs::set_permissions(r.join("d/untracked"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::remove_file(r.join("d/file-or-dir")).unwrap();
        fs::create_dir_all(r.join("d/file-or-dir/sub")).unwrap();
        fs::write(r.join("d/file-or-dir/sub/f"), "x").unwrap();
        symlink("/etc", r.join("d/etc-link")).unwrap();
        let top = r.clone();
        let repo = crate::git::open(&r).unwrap();
        let root = repo
            .find_commit(Oid::from_str(c2.as_str()).unwrap())
            .unwrap()
            .tree()
            .unwrap();
        let target = Target { repo: &repo, root };
        let swept = sweep(&top, &mut ws.sweep_cache, Some(&target), false);
        assert!(swept.clean);
        assert_eq!(swept.cleaned, 6, "{swept:?}");
        for gone in [
            "nested",
            "d/untracked",
            "d/e/x.o",
            "d/etc-link",
            "d/file-or-dir",
        ] {
            assert!(
                fs::symlink_metadata(r.join(gone)).is_err(),
                "{gone} is left"
            );
        }
        assert!(fs::symlink_metadata(r.join("d/e").join(odd)).is_err());
        assert_eq!(fs::read_to_string(r.join("d/e/kept.txt")).unwrap(), "kept");
        assert!(
            r.join(".git/HEAD").is_file(),
            "the clone's own .git is not touched"
        );
        drop(target);
        ws.prepare(&c2, &cancel).await.unwrap();
        assert_exact(&r, &c2);
    }

    #[tokio::test]
    async fn an_index_a_step_rewrote_makes_the_walk_list_every_directory() {
        let (_tmp, m, r, _c1) = setup();
        commit(&m, "d/a.txt", "a");
        let c2 = commit(&m, "d/old.txt", "old");
        git(&m, &["rm", "-q", "d/old.txt"]);
        git(&m, &["commit", "-qm", "remove old"]);
        let c3 = CommitId::parse(&git(&m, &["rev-parse", "HEAD"])).unwrap();
        let cancel = CancellationToken::new();
        let mut ws = Workspace::open(&r, options()).unwrap();
        ws.prepare(&c2, &cancel).await.unwrap();
        ws.prepare(&c2, &cancel).await.unwrap();
        // The step untracks a file: its directory does not change, the index does, and
        // the checkout no longer removes the file.
        git(&r, &["rm", "-q", "--cached", "d/old.txt"]);
        assert!(r.join("d/old.txt").exists());
        ws.prepare(&c3, &cancel).await.unwrap();
        assert!(!r.join("d/old.txt").exists());
        assert_exact(&r, &c3);
    }

    #[tokio::test]
    async fn a_commit_with_submodules_is_cleaned_by_git() {
        let (tmp, m, r, c1) = setup();
        let sub = tmp.path().join("sub");
        fs::create_dir(&sub).unwrap();
        git(&sub, &["init", "-q"]);
        commit(&sub, "s.txt", "s");
        git(
            &m,
            &[
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "add",
                "-q",
                sub.to_str().unwrap(),
                "lib",
            ],
        );
        git(&m, &["commit", "-qm", "submodule"]);
        let c2 = CommitId::parse(&git(&m, &["rev-parse", "HEAD"])).unwrap();
        let cancel = CancellationToken::new();
        let mut ws = Workspace::open(&r, options()).unwrap();
        ws.prepare(&c1, &cancel).await.unwrap();
        ws.prepare(&c2, &cancel).await.unwrap();
        fs::write(r.join("lib/junk"), "x").unwrap();
        fs::write(r.join("junk"), "x").unwrap();
        ws.prepare(&c2, &cancel).await.unwrap();
        assert!(!r.join("lib/junk").exists());
        assert!(!r.join("junk").exists());
        assert_eq!(fs::read_to_string(r.join("lib/s.txt")).unwrap(), "s");
        assert_exact(&r, &c2);
    }

    fn nix_mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[tokio::test]
    async fn a_garbled_or_deleted_git_dir_is_repaired_or_cloned_again() {
        let (_tmp, m, r, c1) = setup();
        let cancel = CancellationToken::new();
        let mut ws = Workspace::open(&r, options()).unwrap();
        ws.prepare(&c1, &cancel).await.unwrap();
        fs::write(r.join(".git/HEAD"), "garbage\n").unwrap();
        let c2 = commit(&m, "b.txt", "b");
        let p = ws.prepare(&c2, &cancel).await.unwrap();
        assert!(
            p.repairs.iter().any(|x| x.contains("HEAD")),
            "{:?}",
            p.repairs
        );
        assert_exact(&r, &c2);

        // A step's config change (here: a smudge filter for every file) is undone.
        git(&r, &["config", "core.autocrlf", "true"]);
        let p = ws.prepare(&c1, &cancel).await.unwrap();
        assert!(
            p.repairs.iter().any(|x| x.contains("config")),
            "{:?}",
            p.repairs
        );
        let config = fs::read_to_string(r.join(".git/config")).unwrap();
        assert!(!config.contains("autocrlf"), "{config}");
        assert_exact(&r, &c1);

        fs::remove_dir_all(r.join(".git")).unwrap();
        let p = ws.prepare(&c2, &cancel).await.unwrap();
        assert!(
            p.repairs.iter().any(|x| x.contains("cloned it again")),
            "{:?}",
            p.repairs
        );
        assert_exact(&r, &c2);
        assert!(r.join(".git").join(OWNED_MARKER).exists());

        // Objects garbled: the checkout fails, the repair does not help, a fresh clone does.
        fs::write(r.join(".git/objects/info/alternates"), "/nonexistent\n").unwrap();
        let c3 = commit(&m, "c.txt", "c");
        ws.prepare(&c3, &cancel).await.unwrap();
        assert_exact(&r, &c3);
    }

    #[tokio::test]
    async fn assume_unchanged_entries_do_not_survive() {
        let (_tmp, _m, r, c1) = setup();
        let cancel = CancellationToken::new();
        let mut ws = Workspace::open(&r, options()).unwrap();
        ws.prepare(&c1, &cancel).await.unwrap();
        git(&r, &["update-index", "--assume-unchanged", "a.txt"]);
        fs::write(r.join("a.txt"), "edited by a step").unwrap();
        let p = ws.prepare(&c1, &cancel).await.unwrap();
        assert!(
            p.repairs.iter().any(|x| x.contains("index")),
            "{:?}",
            p.repairs
        );
        assert_eq!(fs::read_to_string(r.join("a.txt")).unwrap(), "a");
        assert_exact(&r, &c1);
    }

    #[tokio::test]
    async fn hooks_written_by_a_step_are_removed() {
        let (_tmp, m, r, c1) = setup();
        let cancel = CancellationToken::new();
        let mut ws = Workspace::open(&r, options()).unwrap();
        ws.prepare(&c1, &cancel).await.unwrap();
        let hook = r.join(".git/hooks/post-checkout");
        fs::write(&hook, "#!/bin/sh\ntouch \"$GIT_DIR/../pwned\"\n").unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        let c2 = commit(&m, "b.txt", "b");
        ws.prepare(&c2, &cancel).await.unwrap();
        assert!(!hook.exists());
        assert!(!r.join("pwned").exists());
        assert_exact(&r, &c2);
    }

    #[test]
    fn wrong_paths_and_dirty_or_locked_clones_are_refused() {
        let (tmp, _m, r, _c1) = setup();
        let msg = |p: &Path| Workspace::open(p, options()).err().unwrap().to_string();
        assert!(msg(&tmp.path().join("nope")).contains("does not exist"));
        assert!(msg(&r.join(".git"))
            .contains(&format!("pass {}", fs::canonicalize(&r).unwrap().display())));
        git(tmp.path(), &["clone", "-q", "--bare", "master", "bare.git"]);
        assert!(msg(&tmp.path().join("bare.git")).contains("bare repository"));
        fs::create_dir(r.join("sub")).unwrap();
        assert!(msg(&r.join("sub")).contains("inside the work tree of"));
        // r/sub is an untracked directory, but empty ones do not count for git; a file does.
        fs::write(r.join("sub/notes.txt"), "mine").unwrap();
        let e = msg(&r);
        assert!(e.contains("--discard-changes"), "{e}");
        assert!(
            r.join("sub/notes.txt").exists(),
            "nothing is deleted on refusal"
        );
        let ws = Workspace::open(
            &r,
            WorkspaceOptions {
                discard_changes: true,
                ..options()
            },
        )
        .unwrap();
        let e = msg(&r);
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(ws);
        // Once the runner's own, a clone with leftovers is taken without the flag.
        Workspace::open(&r, options()).unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_origin_is_an_infrastructure_error_within_the_deadline() {
        let (_tmp, m, r, _c1) = setup();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming().take(8) {
                held.push(s);
            }
        });
        git(
            &r,
            &[
                "remote",
                "set-url",
                "origin",
                &format!("git://127.0.0.1:{port}/x"),
            ],
        );
        let mut ws = Workspace::open(
            &r,
            WorkspaceOptions {
                discard_changes: false,
                limits: FetchLimits {
                    connect_timeout: Duration::from_millis(700),
                    stall_timeout: Duration::from_millis(700),
                },
            },
        )
        .unwrap();
        let c2 = commit(&m, "b.txt", "b");
        let cancel = CancellationToken::new();
        let started = std::time::Instant::now();
        let e = ws.prepare(&c2, &cancel).await.unwrap_err();
        assert!(e.origin_unreachable(), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let e = ws.probe_origin(&cancel).await.unwrap_err();
        assert!(e.origin_unreachable(), "{e}");
    }
}
