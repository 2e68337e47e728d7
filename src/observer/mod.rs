//! The repo observer: polls its clone's origin, and submits every new commit on the tracked
//! branch to the dispatcher, oldest first.
//!
//! Its only state is the last commit the dispatcher acknowledged, kept in a state file in
//! the clone's `.git` directory and written (atomically) only after the acknowledgement,
//! so a restart neither skips nor repeats commits. On its very first start it reports just
//! the current tip, not the whole history.

pub mod nudge;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tinyci_proto::{CommitId, Connection, FromDispatcher, ProtoError, Role, ToDispatcher};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::git::{self, GitError};
use crate::net::{self, Backoff};
use crate::shutdown::Shutdown;

/// The most commits sent in one `Submit` (the rest follow in the next ones).
pub const MAX_BATCH: usize = 1000;

/// How long the dispatcher may take to acknowledge a submission.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The most commits considered in one poll; a longer history is taken in turns.
const MAX_PER_POLL: usize = 10_000;

/// The state file's name inside the clone's `.git` directory.
pub const STATE_FILE: &str = "tinyci-observer.state";

/// Observer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The observer's own clone of the master repository.
    pub repo: PathBuf,
    /// The dispatcher's `host:port`.
    pub dispatcher: String,
    /// How often origin is polled.
    pub poll_interval: Duration,
    /// The branch to follow; by default origin's default branch.
    pub branch: Option<String>,
    /// The shared secret, if any.
    pub token: Option<String>,
    /// Where the last acknowledged commit is kept; by default `.git/tinyci-observer.state`.
    pub state_file: Option<PathBuf>,
    /// Deadlines of every fetch.
    pub limits: git::FetchLimits,
}

/// Why the observer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    /// The clone is unusable.
    #[error("{0}")]
    Repo(#[from] GitError),
    /// The dispatcher refused us for good (token, protocol version), or is not one.
    #[error("cannot work with the dispatcher: {0}")]
    Dispatcher(#[source] net::NetError),
    /// The state file is unreadable or corrupt.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Where the next poll starts from.
#[derive(Debug, Clone)]
enum Base {
    /// Never seen anything: the first tip seen is reported, and what follows it.
    Fresh,
    /// First seen but not yet acknowledged: report it and what follows.
    Unacked(CommitId),
    /// Acknowledged: report what follows.
    Acked(CommitId),
}

/// Watches the clone until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), ObserverError> {
    let repo = config.repo.clone();
    let branch = config.branch.clone();
    // The clone stays locked while this function runs: a second observer (or a runner) on
    // the same clone is refused.
    let (clone, branch) = tokio::task::spawn_blocking(move || -> Result<_, GitError> {
        let clone = git::Clone::open(&repo)?;
        let branch = match branch {
            Some(b) => b,
            None => git::default_branch(&clone.path)?,
        };
        Ok((clone, branch))
    })
    .await
    .map_err(|e| ObserverError::State {
        path: String::new(),
        message: e.to_string(),
    })??;
    let state_path = config
        .state_file
        .clone()
        .unwrap_or_else(|| clone.git_dir.join(STATE_FILE));
    // A state file that cannot be written would be noticed only at the first commit, as a
    // warning, and the observer would start from scratch at every restart.
    if let Some(dir) = state_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            let what = if dir.exists() {
                "is not a directory"
            } else {
                "does not exist"
            };
            return Err(ObserverError::State {
                path: state_path.display().to_string(),
                message: format!(
                    "its directory {} {what}; create it or pass another --state-file",
                    dir.display()
                ),
            });
        }
    }
    let mut base = match load_state(&state_path, &branch)? {
        Some(c) => Base::Acked(c),
        None => Base::Fresh,
    };
    info!(repo = %clone.path.display(), origin = clone.origin.url(), branch = %branch, dispatcher = %config.dispatcher, poll_interval = ?config.poll_interval, state = %state_path.display(), "watching");

    let token = config.token.clone().unwrap_or_default();
    let mut link = Link {
        conn: None,
        backoff: Backoff::default(),
        next_try: Instant::now(),
        addr: config.dispatcher.clone(),
        token,
        branch: branch.clone(),
    };
    // A local origin can nudge us the moment its branch moves (tinyci's
    // reference-transaction hook); the poll stays as the safety net.
    let mut nudge = match &clone.origin {
        git::Origin::Local { objects, .. } => match objects.parent().map(nudge::Nudge::create) {
            Some(Ok(n)) => {
                info!(fifo = %n.path().display(), "listening for nudges from the origin's hook");
                Some(n)
            }
            Some(Err(e)) => {
                warn!(error = %e, "cannot create the nudge FIFO in the origin; polling only");
                None
            }
            None => None,
        },
        git::Origin::Remote { .. } => None,
    };
    let cancel = shutdown.child_token();
    let local_origin: Option<PathBuf> = match &clone.origin {
        git::Origin::Local { objects, .. } => objects.parent().map(Path::to_path_buf),
        git::Origin::Remote { .. } => None,
    };
    let mut fetched_tip: Option<CommitId> = None;
    let mut failures = Backoff::default();
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
            _ = async {
                match nudge.as_mut() {
                    Some(n) => n.wait().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::debug!("nudged: polling now");
                tick.reset();
            }
        }
        let polled = poll(
            &clone.path,
            local_origin.as_deref(),
            &branch,
            base.clone(),
            config.limits,
            &cancel,
        )
        .await;
        let (new_base, pending, tip) = match polled {
            Ok(found) => {
                failures.reset();
                found
            }
            Err(e) if e.kind == git::GitErrorKind::Cancelled => return Ok(()),
            Err(e) => {
                // Origin unreachable or the branch missing: say so, and back off so a dead
                // origin is not hammered (and the log not flooded) once per poll.
                let delay = failures.next_delay().max(config.poll_interval);
                warn!(error = %e, retry_in = ?delay, "poll failed; will try again");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        base = new_base;
        for batch in pending.chunks(MAX_BATCH) {
            let Some(acked) = link
                .submit(batch)
                .await
                .map_err(ObserverError::Dispatcher)?
            else {
                break;
            };
            let last = acked.clone();
            // The fsync runs off the async runtime's threads.
            let (path, b, c) = (state_path.clone(), branch.clone(), last.clone());
            let saved = tokio::task::spawn_blocking(move || save_state(&path, &b, &c))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            if let Err(e) = saved {
                // Keep going: at worst a restart resubmits, and the dispatcher drops repeats.
                warn!(error = %e, "cannot save the observer state");
            }
            base = Base::Acked(last);
        }
        // A local origin was read in place: bring the clone's view of the branch up to
        // date once the commits are on their way (a failure here costs nothing but a
        // stale remote-tracking ref, and is retried at the next move).
        if local_origin.is_some() && fetched_tip.as_ref() != Some(&tip) {
            match git::fetch_branch_tip(&clone.path, &branch, config.limits, &cancel).await {
                Ok(_) => fetched_tip = Some(tip),
                Err(e) if e.kind == git::GitErrorKind::Cancelled => return Ok(()),
                Err(e) => warn!(error = %e, "cannot update the clone from its origin"),
            }
        }
    }
}

/// Fetches the branch and computes the commits to report, oldest first, and the base they
/// lead to.
async fn poll(
    repo: &Path,
    local_origin: Option<&Path>,
    branch: &str,
    base: Base,
    limits: git::FetchLimits,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(Base, Vec<CommitId>, CommitId), GitError> {
    // An origin on this machine is read in place: its branch and history are there, and a
    // `git fetch` (a process, a negotiation) would only add its tens of milliseconds to
    // every commit's way to the dispatcher. The clone is brought up to date after the
    // commits are submitted. Anything else is fetched first.
    let local = match local_origin {
        Some(origin) => {
            let (o, b) = (origin.to_path_buf(), branch.to_owned());
            match tokio::task::spawn_blocking(move || git::branch_tip(&o, &b)).await {
                Ok(Ok(tip)) => Some((tip, origin.to_path_buf())),
                // Not readable in place (a ref format libgit2 does not read, a race with a
                // repack…): fetch as for a remote origin.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot read the origin in place; fetching");
                    None
                }
                Err(_) => None,
            }
        }
        None => None,
    };
    let (tip, history) = match local {
        Some(pair) => pair,
        None => (
            git::fetch_branch_tip(repo, branch, limits, cancel).await?,
            repo.to_path_buf(),
        ),
    };
    let seen = tip.clone();
    let (base, commits) = tokio::task::spawn_blocking(move || -> Result<_, GitError> {
        Ok(match base {
            Base::Fresh => (Base::Unacked(tip.clone()), vec![tip]),
            Base::Unacked(first) => {
                let mut v = vec![first.clone()];
                v.extend(git::commits_between(&history, &first, &tip, MAX_PER_POLL)?);
                (Base::Unacked(first), v)
            }
            Base::Acked(last) => {
                let v = git::commits_between(&history, &last, &tip, MAX_PER_POLL)?;
                (Base::Acked(last), v)
            }
        })
    })
    .await
    .unwrap_or_else(|e| Err(GitError::task_failed(e)))?;
    Ok((base, commits, seen))
}

/// The connection to the dispatcher, made and remade on demand with backoff.
struct Link {
    conn: Option<Connection<TcpStream>>,
    backoff: Backoff,
    next_try: Instant,
    addr: String,
    token: String,
    branch: String,
}

impl Link {
    /// Submits `batch` and returns its last commit once acknowledged; `None` if the
    /// dispatcher cannot be reached now (a later poll retries); an error if it never will
    /// be (it refused our hello, or is not a tinyci dispatcher).
    async fn submit<'a>(
        &mut self,
        batch: &'a [CommitId],
    ) -> Result<Option<&'a CommitId>, net::NetError> {
        // A kept connection may have died since the last poll: one immediate retry on a
        // fresh connection before backing off.
        for _ in 0..2 {
            let reused = self.conn.is_some();
            if !reused {
                if Instant::now() < self.next_try {
                    return Ok(None);
                }
                match net::connect(&self.addr, Role::Observer, &self.token).await {
                    Ok(c) => {
                        info!(dispatcher = %self.addr, "connected to the dispatcher");
                        self.conn = Some(c);
                    }
                    Err(e) if e.is_permanent() => return Err(e),
                    Err(e) => {
                        let delay = self.backoff.next_delay();
                        self.next_try = Instant::now() + delay;
                        warn!(error = %e, retry_in = ?delay, pending = batch.len(), "dispatcher unreachable; commits kept for the next try");
                        return Ok(None);
                    }
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return Ok(None);
            };
            match exchange(conn, batch, &self.branch).await {
                Ok((queued, known)) => {
                    // Only an answered submission proves the link: a dispatcher that
                    // accepts connections and then fails them must not be hammered.
                    self.backoff.reset();
                    info!(commits = batch.len(), queued, known, last = %batch[batch.len() - 1], "submitted");
                    return Ok(batch.last());
                }
                Err(e) if reused => {
                    // Most likely the kept connection died since the last poll.
                    self.conn = None;
                    warn!(error = %e, "submission failed on the kept connection; trying a new one");
                }
                Err(e) => {
                    self.conn = None;
                    let delay = self.backoff.next_delay();
                    self.next_try = Instant::now() + delay;
                    warn!(error = %e, retry_in = ?delay, pending = batch.len(), "submission not acknowledged; commits kept for the next try");
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }
}

async fn exchange(
    conn: &mut Connection<TcpStream>,
    batch: &[CommitId],
    branch: &str,
) -> Result<(u32, u32), ProtoError> {
    conn.send(&ToDispatcher::Submit {
        commits: batch.to_vec(),
        branch: Some(branch.to_owned()),
        front: false,
        rerun: false,
    })
    .await?;
    match conn
        .recv_within::<FromDispatcher>(ACK_TIMEOUT, "the dispatcher's acknowledgement")
        .await?
    {
        FromDispatcher::Submitted { queued, known } => Ok((queued, known)),
        // Not recorded yet: kept and submitted again, when the dispatcher answers `known`.
        FromDispatcher::Error { reason } | FromDispatcher::NotRecorded { reason } => {
            Err(ProtoError::Refused(reason))
        }
        other => Err(ProtoError::Violation(format!(
            "expected Submitted, got {other:?}"
        ))),
    }
}

fn load_state(path: &Path, branch: &str) -> Result<Option<CommitId>, ObserverError> {
    let bad = |message: String| ObserverError::State {
        path: path.display().to_string(),
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let mut parts = text.split_whitespace();
    let (Some(b), Some(sha), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad(
            "corrupt: expected \"BRANCH SHA\"; delete it to start again from the current tip"
                .into(),
        ));
    };
    let commit = CommitId::parse(sha).map_err(|e| bad(e.to_string()))?;
    if b != branch {
        info!(
            previous = b,
            branch, "state is for another branch; starting from the tip"
        );
        return Ok(None);
    }
    Ok(Some(commit))
}

fn save_state(path: &Path, branch: &str, commit: &CommitId) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{branch} {commit}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_corruption_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        assert!(load_state(&p, "master").unwrap().is_none());
        let c = CommitId::parse(&"1".repeat(40)).unwrap();
        save_state(&p, "master", &c).unwrap();
        assert_eq!(load_state(&p, "master").unwrap(), Some(c));
        assert!(load_state(&p, "other").unwrap().is_none());
        std::fs::write(&p, "master ../../etc").unwrap();
        assert!(load_state(&p, "master").is_err());
        std::fs::write(&p, "").unwrap();
        let e = load_state(&p, "master").unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
