//! The newest runs as one shared snapshot, for the live page's event stream.
//!
//! One task keeps it: it reads the newest page of runs once, then, after each batch of the
//! core, asks the core only about the commits that batch changed (queued, handed out,
//! returned, finished — noted by [`Touched`] as the core stages them), by id: point
//! lookups, never a scan of the history, so a long history costs nothing per batch. Each
//! `/events` client compares the snapshot with what it last sent and sends the
//! difference. The watch channel holds only the latest snapshot, so a slow client skips
//! states instead of queueing them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tinyci_proto::{CommitId, FromDispatcher, RunQuery, RunSummary, ToDispatcher};
use tracing::debug;

use super::{ApiError, App};

/// How many of the newest runs the live list shows and the stream watches.
pub(crate) const LIVE_RUNS: u32 = 50;

/// At most this many changed commits are kept between two refreshes; past it the
/// snapshot is read again whole.
const MAX_TOUCHED: usize = 10_000;

/// How long to wait before reading the newest runs again after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// The newest runs, as of one batch of the core.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// Newest first (by the time they were queued).
    pub runs: Vec<RunSummary>,
}

/// The commits whose state the core changed and made durable, since the last look.
#[derive(Debug, Default)]
pub struct Touched {
    inner: Mutex<TouchedInner>,
}

#[derive(Debug, Default)]
struct TouchedInner {
    commits: Vec<CommitId>,
    overflow: bool,
}

impl Touched {
    /// Notes commits whose changes are now durable.
    pub(crate) fn publish(&self, commits: impl IntoIterator<Item = CommitId>) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for c in commits {
            if t.commits.len() >= MAX_TOUCHED {
                t.overflow = true;
                t.commits.clear();
            }
            if !t.overflow {
                t.commits.push(c);
            }
        }
    }

    /// The commits noted since the last call (`Err` when there were too many to keep).
    pub(crate) fn take(&self) -> Result<Vec<CommitId>, ()> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let commits = std::mem::take(&mut t.commits);
        if std::mem::take(&mut t.overflow) {
            return Err(());
        }
        Ok(commits)
    }
}

/// The newest page of runs, from the core.
async fn newest(app: &App) -> Result<Vec<RunSummary>, ApiError> {
    match app
        .ask(ToDispatcher::Runs(RunQuery {
            limit: LIVE_RUNS,
            ..RunQuery::default()
        }))
        .await?
    {
        FromDispatcher::Runs { runs, .. } => Ok(runs),
        other => Err(super::unexpected(&other)),
    }
}

/// Brings `runs` up to date with what the core says of `touched`.
async fn update(app: &App, runs: &mut Vec<RunSummary>, touched: Vec<CommitId>) {
    let mut seen = HashSet::new();
    for commit in touched {
        if !seen.insert(commit.clone()) {
            continue;
        }
        let fresh = match app.run(commit.as_str()).await {
            Ok(d) => d.summary,
            Err(e) => {
                debug!(commit = %commit, error = %e, "live list: run not read");
                continue;
            }
        };
        match runs.iter_mut().find(|r| r.commit == commit) {
            Some(r) => *r = fresh,
            None => runs.push(fresh),
        }
    }
    // Newest first; what falls past the page is forgotten.
    runs.sort_by_key(|r| std::cmp::Reverse(r.queued_at_ms));
    runs.truncate(LIVE_RUNS as usize);
}

/// Keeps the shared snapshot fresh until shutdown.
pub(crate) async fn refresh(app: App) {
    let mut changed = app.core.log_changed.clone();
    let mut runs: Option<Vec<RunSummary>> = None;
    loop {
        changed.borrow_and_update();
        let touched = app.core.counters.touched.take();
        let next = match (runs.take(), touched) {
            (Some(mut r), Ok(t)) => {
                update(&app, &mut r, t).await;
                Some(r)
            }
            // At start, or after too many changes to follow one by one: read it whole.
            _ => match newest(&app).await {
                Ok(r) => Some(r),
                Err(e) => {
                    debug!(error = %e, "live list not read; trying again");
                    tokio::select! {
                        _ = app.shutdown.cancelled() => return,
                        () = tokio::time::sleep(RETRY) => continue,
                    }
                }
            },
        };
        if let Some(r) = &next {
            app.live.send_if_modified(|old| {
                if old.runs == *r {
                    false
                } else {
                    *old = Arc::new(Snapshot { runs: r.clone() });
                    true
                }
            });
        }
        runs = next;
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            res = changed.changed() => if res.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(i: usize) -> CommitId {
        CommitId::parse(&format!("{i:040x}")).unwrap()
    }

    #[test]
    fn touched_commits_are_handed_over_once_and_too_many_ask_for_a_whole_read() {
        let t = Touched::default();
        t.publish([c(1), c(2)]);
        assert_eq!(t.take(), Ok(vec![c(1), c(2)]));
        assert_eq!(t.take(), Ok(vec![]));
        t.publish((0..=MAX_TOUCHED).map(c));
        assert_eq!(t.take(), Err(()));
        assert_eq!(t.take(), Ok(vec![]));
    }
}
