//! The newest runs as one shared snapshot, for the live page's event stream: one task asks
//! the core after each of its batches (while anybody watches) and publishes the answer;
//! each `/events` client compares it with what it last sent and sends the difference. The
//! watch channel holds only the latest snapshot, so a slow client skips states instead
//! of queueing them.

use std::sync::Arc;
use std::time::Duration;

use tinyci_proto::{FromDispatcher, RunQuery, RunSummary, ToDispatcher};
use tracing::debug;

use super::{ApiError, App};

/// How many of the newest runs the live list shows and the stream watches.
pub(crate) const LIVE_RUNS: u32 = 50;

/// A safety net: the snapshot is refreshed this often even without a notification.
const RECHECK: Duration = Duration::from_secs(2);

/// The newest runs and the runs in flight, as of one batch of the core.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// The core's change counter when this was asked.
    pub seq: u64,
    /// Queued and running runs, and the newest ones (deduplicated, newest first).
    pub runs: Vec<RunSummary>,
    /// How many runs there are in all.
    pub total: u64,
}

/// Asks the core for a fresh snapshot.
pub(crate) async fn take(app: &App, seq: u64) -> Result<Snapshot, ApiError> {
    let status = app.status().await?;
    let (total, newest) = match app
        .ask(ToDispatcher::Runs(RunQuery {
            limit: LIVE_RUNS,
            ..RunQuery::default()
        }))
        .await?
    {
        FromDispatcher::Runs { total, runs } => (total, runs),
        other => return Err(super::unexpected(&other)),
    };
    let mut runs = newest;
    // Running ones from the scheduler (with their live attempt count) replace the
    // database's lines; an old commit run again may be missing from the newest page.
    for r in status.running {
        match runs.iter_mut().find(|x| x.commit == r.commit) {
            Some(x) => *x = r,
            None => runs.insert(0, r),
        }
    }
    Ok(Snapshot { seq, runs, total })
}

/// Keeps the shared snapshot fresh while anybody watches it.
pub(crate) async fn refresh(app: App) {
    let mut changed = app.core.log_changed.clone();
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            res = changed.changed() => if res.is_err() { return },
            () = tokio::time::sleep(RECHECK) => {}
        }
        if app.live.receiver_count() == 0 {
            continue;
        }
        let seq = *changed.borrow_and_update();
        match take(&app, seq).await {
            Ok(snap) => {
                app.live.send_if_modified(|old| {
                    if old.runs == snap.runs && old.total == snap.total {
                        false
                    } else {
                        *old = Arc::new(snap);
                        true
                    }
                });
            }
            Err(e) => debug!(error = %e, "live snapshot not refreshed"),
        }
    }
}
