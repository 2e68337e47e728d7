//! The store's own thread: it commits the core's batches while the core goes on with the
//! next one, so the database's fsync and the core's work overlap instead of adding up.
//!
//! The core stages [`Op`]s here as before and ends each batch with [`StoreThread::send`],
//! which hands them over numbered (the batch's *sequence number*). The thread commits
//! whatever batches are waiting as one transaction (group commit: while one fsync runs,
//! the next batches queue up and share the next one) and answers with [`Committed`]:
//! every batch up to a number is durable, or the commit failed. A failed commit keeps its
//! ops staged, in order, with every later batch's added after them, and is tried again
//! every [`STORE_RETRY`] until it succeeds; nothing is applied twice or out of order.
//!
//! The core releases what a batch promised (replies, result acknowledgements, assignments,
//! result files) only once [`Committed::Durable`] covers it, so "acknowledged only when
//! durable" holds exactly as when the core committed itself. Answers come on a channel of
//! their own, never behind the core's event queue, and a `wake` call makes a core that is
//! waiting for events look at them.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tinyci_proto::CommitId;

use super::watch::WATCH_EVERY;
use super::{Op, Store, StoreError};

/// How often a database that cannot be written is tried again.
pub const STORE_RETRY: Duration = Duration::from_millis(500);

/// Said once when the dispatcher stops with batches the database could not record.
pub const UNRECORDED_AT_STOP: &str = "stopping with changes the database could not record: unacknowledged results will be reported again by their runners, or run again";

/// What became of the batches sent so far.
#[derive(Debug)]
pub enum Committed {
    /// Every batch up to and including this sequence number is durable.
    Durable(u64),
    /// The batches up to this sequence number are not durable: the commit failed. They
    /// stay staged and are tried again.
    Failed {
        /// The newest batch that is not durable.
        upto: u64,
        /// Why.
        error: StoreError,
    },
    /// The database's files were deleted, moved or replaced (said once, in words): the
    /// dispatcher must stop. The thread saves a copy of the database when it is closed.
    Lost(String),
}

/// Said once a batch is durable, on the store thread, before anyone hears of it.
pub type OnDurable = Box<dyn FnOnce() + Send>;

/// A batch as sent to the thread: its number, its ops, and what to say once durable.
type Sent = (u64, Vec<Op>, Option<OnDurable>);

/// The core's side of the store thread.
pub struct StoreThread {
    tx: Option<Sender<Sent>>,
    answers: Receiver<Committed>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Ops of the batch being built.
    staged: Vec<Op>,
    /// The sequence number of the last batch sent (0: none yet).
    sent: u64,
    /// Every batch up to this one is durable.
    durable: u64,
    /// Commits finished (or imported) by batches that are not durable yet, and the batch.
    /// The database's readers do not see them yet.
    finishing: HashMap<CommitId, u64>,
}

impl StoreThread {
    /// Starts the thread, which owns `store` from now on. `wake` is called after each
    /// answer, from the store thread.
    pub fn start(
        store: Box<dyn Store + Send>,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<StoreThread> {
        let (tx, rx) = mpsc::channel();
        let (answer_tx, answers) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || commit_until_closed(store, &rx, &answer_tx, &wake))?;
        Ok(StoreThread {
            tx: Some(tx),
            answers,
            thread: Some(thread),
            staged: Vec::new(),
            sent: 0,
            durable: 0,
            finishing: HashMap::new(),
        })
    }

    /// Adds `op` to the batch being built.
    pub fn stage(&mut self, op: Op) {
        if let Op::Finished { run, .. } | Op::Imported { run } = &op {
            self.finishing.insert(run.commit.clone(), self.sent + 1);
        }
        self.staged.push(op);
    }

    /// Ends the batch being built: its ops, if any, go to the thread, with `on_durable`,
    /// which the thread calls right after the commit that makes them durable and before it
    /// answers (the log lines that announce what the batch lets out: said at once, so a
    /// `kill -9` between the commit and them is as unlikely as it was when the core
    /// committed itself). Returns the sequence number whose durability the batch's
    /// promises wait for: its own, or, if it staged nothing, that of the last batch sent
    /// (what it decided may rest on those); `on_durable` is then called at once.
    pub fn send(&mut self, on_durable: Option<OnDurable>) -> u64 {
        if self.staged.is_empty() {
            if let Some(say) = on_durable {
                say();
            }
            return self.sent;
        }
        self.sent += 1;
        let ops = std::mem::take(&mut self.staged);
        let delivered = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send((self.sent, ops, on_durable)).is_ok());
        if !delivered {
            // The thread is gone (it panicked): nothing will ever be durable. Say so the
            // way a failing database does.
            tracing::error!("the store thread is gone: nothing more can be recorded");
        }
        self.sent
    }

    /// Whether every batch up to `seq` is durable.
    pub fn is_durable(&self, seq: u64) -> bool {
        seq <= self.durable
    }

    /// Whether batches were sent that are not durable yet, or ops are staged.
    pub fn has_unsettled(&self) -> bool {
        self.durable < self.sent || !self.staged.is_empty()
    }

    /// Whether `commit` finished in a batch that is not durable yet (the database's
    /// readers do not know it yet).
    pub fn is_finishing(&self, commit: &CommitId) -> bool {
        self.finishing.contains_key(commit)
    }

    /// The answers that arrived since the last call.
    pub fn answers(&mut self) -> Vec<Committed> {
        let got: Vec<Committed> = self.answers.try_iter().collect();
        for a in &got {
            self.note(a);
        }
        got
    }

    /// Waits for the next answer; `None` if the thread is gone.
    pub fn wait(&mut self) -> Option<Committed> {
        let a = self.answers.recv().ok()?;
        self.note(&a);
        Some(a)
    }

    fn note(&mut self, a: &Committed) {
        if let Committed::Durable(upto) = a {
            self.durable = self.durable.max(*upto);
            let durable = self.durable;
            self.finishing.retain(|_, seq| *seq > durable);
        }
    }
}

impl Drop for StoreThread {
    /// Lets the thread finish what it was sent (one last try for a failing commit).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's loop: commits what arrives, batches that wait together in one
/// transaction; retries a failed commit every [`STORE_RETRY`]; answers after each try.
/// Every [`WATCH_EVERY`] it looks whether the database's files are still the ones opened;
/// once they are not, it says so ([`Committed::Lost`]) and, when closed, saves a copy of
/// the database for the next start.
fn commit_until_closed(
    mut store: Box<dyn Store + Send>,
    rx: &Receiver<Sent>,
    answers: &Sender<Committed>,
    wake: &dyn Fn(),
) {
    let mut upto = 0;
    // What to say once the staged ops are durable, in order.
    let mut to_say: Vec<OnDurable> = Vec::new();
    let mut next_look = Instant::now() + WATCH_EVERY;
    let mut lost = false;
    // Whether the last commit failed: then a close does not try again (the core, which
    // closes it, has said what is left unrecorded).
    let mut failing = false;
    loop {
        let limit = if store.has_staged() {
            STORE_RETRY
        } else {
            next_look.saturating_duration_since(Instant::now())
        };
        let (first, closed) = match rx.recv_timeout(limit) {
            Ok(b) => (Some(b), false),
            Err(RecvTimeoutError::Timeout) => (None, false),
            Err(RecvTimeoutError::Disconnected) => (None, true),
        };
        let got = first.is_some();
        for (seq, ops, say) in first.into_iter().chain(rx.try_iter()) {
            for op in ops {
                store.stage(op);
            }
            to_say.extend(say);
            upto = seq;
        }
        if (got || store.has_staged()) && !(closed && failing) {
            let answer = match store.commit() {
                Ok(()) => {
                    for say in to_say.drain(..) {
                        say();
                    }
                    Committed::Durable(upto)
                }
                Err(error) => Committed::Failed { upto, error },
            };
            let failed = matches!(answer, Committed::Failed { .. });
            failing = failed;
            if answers.send(answer).is_err() && !lost {
                return;
            }
            wake();
            if closed && failed {
                tracing::error!("{UNRECORDED_AT_STOP}");
            }
        }
        if !lost && Instant::now() >= next_look {
            next_look = Instant::now() + WATCH_EVERY;
            if let Some(what) = store.lost() {
                lost = true;
                tracing::error!(what, "the database's files are gone from under the dispatcher: stopping, and saving what the open database holds");
                let _ = answers.send(Committed::Lost(what));
                wake();
            }
        }
        if closed {
            if lost {
                match store.rescue() {
                    Ok(to) => {
                        tracing::error!(to = %to.display(), "saved the database; {}", super::watch::what_next(&to))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot save the database: the history since it was opened is lost")
                    }
                }
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::store::sqlite::SqliteStore;
    use std::time::SystemTime;

    fn c(n: u32) -> CommitId {
        CommitId::parse(&format!("{n:040x}")).unwrap()
    }

    fn queued(n: u32) -> Op {
        Op::Queued {
            commit: c(n),
            branch: None,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(n.into()),
        }
    }

    fn count(dir: &std::path::Path) -> i64 {
        let conn =
            rusqlite::Connection::open(crate::dispatcher::store::sqlite::db_path(dir)).unwrap();
        conn.query_row("SELECT count(*) FROM commits", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn batches_are_answered_in_order_and_durable_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let mut t = StoreThread::start(Box::new(store), || {}).unwrap();
        assert_eq!(t.send(None), 0, "nothing staged, nothing sent");
        for n in 1..=50 {
            t.stage(queued(n));
            assert_eq!(t.send(None), u64::from(n));
        }
        assert!(t.has_unsettled() || t.is_durable(50));
        let mut last = 0;
        while last < 50 {
            match t.wait().expect("an answer") {
                Committed::Durable(upto) => {
                    assert!(upto > last, "answers move forward");
                    last = upto;
                    assert!(count(dir.path()) >= i64::from(u32::try_from(upto).unwrap()));
                }
                Committed::Failed { error, .. } => panic!("{error}"),
                Committed::Lost(what) => panic!("{what}"),
            }
        }
        assert!(t.is_durable(50) && !t.has_unsettled());
        assert_eq!(count(dir.path()), 50);
    }

    #[test]
    fn a_finished_commit_is_known_as_finishing_until_its_batch_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::prepare_dir(dir.path()).unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let mut t = StoreThread::start(Box::new(store), || {}).unwrap();
        t.stage(queued(1));
        let run = crate::dispatcher::state::Finished {
            commit: c(1),
            status: tinyci_proto::RunStatus::Success,
            steps: Vec::new(),
            runner: None,
            attempts: 0,
            queued_at: SystemTime::UNIX_EPOCH,
            started_at: None,
            finished_at: SystemTime::UNIX_EPOCH,
            error: None,
        };
        t.stage(Op::Finished { last: None, run });
        assert!(t.is_finishing(&c(1)));
        let seq = t.send(None);
        while !t.is_durable(seq) {
            t.wait().expect("an answer");
        }
        assert!(!t.is_finishing(&c(1)));
    }

    /// A store that fails every commit while `failing` is set, and keeps what it committed.
    struct Flaky {
        staged: Vec<Op>,
        committed: std::sync::Arc<std::sync::Mutex<Vec<Op>>>,
        failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Store for Flaky {
        fn stage(&mut self, op: Op) {
            self.staged.push(op);
        }
        fn commit(&mut self) -> Result<(), StoreError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Io {
                    what: "writing".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            self.committed.lock().unwrap().append(&mut self.staged);
            Ok(())
        }
        fn has_staged(&self) -> bool {
            !self.staged.is_empty()
        }
        fn unfinished(&mut self) -> Result<Vec<crate::dispatcher::store::Unfinished>, StoreError> {
            Ok(Vec::new())
        }
        fn unsynced_results(
            &mut self,
        ) -> Result<Vec<crate::dispatcher::state::Finished>, StoreError> {
            Ok(Vec::new())
        }
        fn journal_imported(&mut self) -> Result<bool, StoreError> {
            Ok(true)
        }
        fn forget_runners(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_commit_is_retried_by_the_thread_with_later_batches_after_it_and_applied_once() {
        let committed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let store = Flaky {
            staged: Vec::new(),
            committed: committed.clone(),
            failing: failing.clone(),
        };
        let mut t = StoreThread::start(Box::new(store), || {}).unwrap();
        t.stage(queued(1));
        let first = t.send(None);
        match t.wait().expect("an answer") {
            Committed::Failed { upto, .. } => assert_eq!(upto, first),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(!t.is_durable(first) && t.has_unsettled());
        // A later batch while the first is still failing: committed with it, so it fails
        // too.
        t.stage(queued(2));
        let second = t.send(None);
        loop {
            match t.wait().expect("an answer") {
                Committed::Failed { upto, .. } if upto == second => break,
                Committed::Failed { .. } => {}
                other => panic!("expected a failure, got {other:?}"),
            }
        }
        assert!(committed.lock().unwrap().is_empty(), "nothing applied yet");
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        // Without being sent again, both are committed by a retry, in order, once each.
        while !t.is_durable(second) {
            t.wait().expect("the retry's answer");
        }
        assert_eq!(*committed.lock().unwrap(), vec![queued(1), queued(2)]);
    }
}
