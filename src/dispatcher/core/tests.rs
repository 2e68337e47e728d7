//! The core's loop against the real store thread and database, with gates that stop the
//! store's commit and the core's reads where a test needs them to (races made exact).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tinyci_proto::{CommitId, FromDispatcher, ToDispatcher};
use tokio::sync::{mpsc::UnboundedReceiver, oneshot};

use super::{Core, Event};
use crate::dispatcher::state::Finished;
use crate::dispatcher::store::sqlite::{SqliteReader, SqliteStore};
use crate::dispatcher::store::{
    History, Op, Page, RunDetail, RunFilter, RunState, RunSummary, Store, StoreError, Unfinished,
};

const WAIT: Duration = Duration::from_secs(10);

/// Stops the one call that passes it after [`Gate::arm`], until [`Gate::open`].
#[derive(Clone)]
struct Gate(Arc<GateInner>);

struct GateInner {
    armed: AtomicBool,
    entered: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
}

/// The test's side of a [`Gate`].
struct GateControl {
    gate: Gate,
    entered: Receiver<()>,
    go: Sender<()>,
}

impl GateControl {
    fn new() -> GateControl {
        let (entered_tx, entered) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        GateControl {
            gate: Gate(Arc::new(GateInner {
                armed: AtomicBool::new(false),
                entered: Mutex::new(entered_tx),
                go: Mutex::new(go_rx),
            })),
            entered,
            go,
        }
    }
}

impl Gate {
    fn pass(&self) {
        if self.0.armed.swap(false, Ordering::SeqCst) {
            let _ = self.0.entered.lock().unwrap().send(());
            let _ = self.0.go.lock().unwrap().recv_timeout(WAIT);
        }
    }
}

impl GateControl {
    fn arm(&self) {
        self.gate.0.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until a call is stopped at the gate.
    fn wait_entered(&self, what: &str) {
        self.entered
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("{what} never reached its gate"));
    }

    fn open(&self) {
        self.go.send(()).unwrap();
    }
}

/// The real store, whose commit stops at a gate, and fails (as with a lock held by
/// another program) while `fail` is set.
struct GatedStore {
    inner: SqliteStore,
    gate: Gate,
    fail: Arc<AtomicBool>,
    /// Commit calls so far.
    tries: Arc<AtomicUsize>,
}

impl Store for GatedStore {
    fn stage(&mut self, op: Op) {
        self.inner.stage(op);
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        self.gate.pass();
        self.tries.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Db {
                what: "committing",
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                    None,
                ),
            });
        }
        self.inner.commit()
    }
    fn has_staged(&self) -> bool {
        self.inner.has_staged()
    }
    fn unfinished(&mut self) -> Result<Vec<Unfinished>, StoreError> {
        self.inner.unfinished()
    }
    fn unsynced_results(&mut self) -> Result<Vec<Finished>, StoreError> {
        self.inner.unsynced_results()
    }
    fn journal_imported(&mut self) -> Result<bool, StoreError> {
        self.inner.journal_imported()
    }
    fn forget_runners(&mut self) -> Result<(), StoreError> {
        self.inner.forget_runners()
    }
    fn lost(&mut self) -> Option<String> {
        self.inner.lost()
    }
    fn rescue(&mut self) -> Result<std::path::PathBuf, StoreError> {
        self.inner.rescue()
    }
}

/// The real read side, whose `counts` (a status question) stops at a gate.
struct GatedHistory {
    inner: SqliteReader,
    gate: Gate,
}

impl History for GatedHistory {
    fn runs(&self, filter: &RunFilter) -> Result<Page<RunSummary>, StoreError> {
        self.inner.runs(filter)
    }
    fn run(&self, commit: &CommitId) -> Result<Option<RunDetail>, StoreError> {
        self.inner.run(commit)
    }
    fn queue(&self) -> Result<Vec<RunSummary>, StoreError> {
        self.inner.queue()
    }
    fn by_prefix(&self, prefix: &str, max: u32) -> Result<Vec<CommitId>, StoreError> {
        self.inner.by_prefix(prefix, max)
    }
    fn is_recorded(&self, commit: &CommitId) -> Result<bool, StoreError> {
        self.inner.is_recorded(commit)
    }
    fn counts(&self) -> Result<Vec<(RunState, u64)>, StoreError> {
        self.gate.pass();
        self.inner.counts()
    }
}

/// A core on its own thread over a fresh results directory.
struct Running {
    events: SyncSender<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
    /// Makes the store's commits fail while set.
    fail: Arc<AtomicBool>,
    /// How many commits the store was asked for.
    tries: Arc<AtomicUsize>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a core whose store commits stop at `store_gate` and whose status reads stop at
/// `read_gate`; `woke` hears of every wake-up call the store thread makes (after it is
/// made).
fn start(store_gate: Gate, read_gate: Gate, woke: Sender<()>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    crate::results::prepare_dir(dir.path()).unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let tries = Arc::new(AtomicUsize::new(0));
    let store = GatedStore {
        inner: SqliteStore::open(dir.path()).unwrap(),
        gate: store_gate,
        fail: fail.clone(),
        tries: tries.clone(),
    };
    let history = GatedHistory {
        inner: SqliteReader::open(dir.path()).unwrap(),
        gate: read_gate,
    };
    let reads = SqliteReader::open(dir.path()).unwrap();
    let (events, rx) = mpsc::sync_channel(64);
    let wake_events = events.clone();
    let woke = Mutex::new(woke);
    let core = Core::new(
        dir.path().to_owned(),
        Box::new(store),
        Box::new(history),
        Box::new(reads),
        tokio::sync::watch::channel(0u64).0,
        3,
        Vec::new(),
        Duration::from_secs(6),
        move || {
            let _ = wake_events.try_send(Event::Wake);
            let _ = woke.lock().unwrap().send(());
        },
    )
    .unwrap();
    let thread = std::thread::spawn(move || {
        core.run(rx).unwrap();
    });
    Running {
        events,
        thread: Some(thread),
        dir,
        fail,
        tries,
    }
}

impl Running {
    /// Submits `commits`; the answer comes on the receiver.
    fn send_submit(&self, commits: Vec<CommitId>) -> oneshot::Receiver<FromDispatcher> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Submit {
                commits,
                branch: None,
                front: false,
                rerun: false,
                reply,
            })
            .unwrap();
        answer
    }

    /// Submits `commits` and returns the answer.
    fn submit(&self, commits: Vec<CommitId>) -> FromDispatcher {
        recv_within(self.send_submit(commits), "the submission's answer")
    }
}

fn commit(n: u32) -> CommitId {
    CommitId::parse(&format!("{n:040x}")).unwrap()
}

fn recv_within<T: Send + 'static>(rx: oneshot::Receiver<T>, what: &str) -> T {
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(rx.blocking_recv());
    });
    match done.recv_timeout(WAIT) {
        Ok(Ok(v)) => v,
        _ => panic!("no {what} within {WAIT:?}"),
    }
}

/// The next message to a runner, if one comes within `limit`.
fn next_to_runner(
    rx: &mut UnboundedReceiver<FromDispatcher>,
    limit: Duration,
) -> Option<FromDispatcher> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(m) = rx.try_recv() {
            return Some(m);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The store thread's wake-up call can be taken by the core in the middle of a batch,
/// after the core looked at the store's answers for that batch: the answer it announces
/// must still be seen before the core waits again. (It was not: the assignment of a batch
/// whose wake-up came while the core was answering a status question waited for the next
/// event, which in a quiet cluster never came; the runner sat idle with a job assigned.)
#[test]
fn a_wake_up_taken_in_the_middle_of_a_batch_still_lets_out_what_it_announces() {
    let store_gate = GateControl::new();
    let read_gate = GateControl::new();
    let (woke_tx, woke) = mpsc::channel();
    let core = start(store_gate.gate.clone(), read_gate.gate.clone(), woke_tx);

    let (reply, answer) = oneshot::channel();
    core.events
        .send(Event::Submit {
            commits: vec![commit(1)],
            branch: None,
            front: false,
            rerun: false,
            reply,
        })
        .unwrap();
    assert!(
        matches!(
            recv_within(answer, "Submitted"),
            FromDispatcher::Submitted { queued: 1, .. }
        ),
        "the commit was not queued"
    );
    while woke.try_recv().is_ok() {}

    // The runner joins; the batch that assigns it the commit stops in the store's commit.
    store_gate.arm();
    let (tx, mut to_runner) = tokio::sync::mpsc::unbounded_channel();
    let (reply, joined) = oneshot::channel();
    core.events
        .send(Event::RunnerJoined {
            addr: "127.0.0.1:1".into(),
            held: None,
            paused: None,
            tx,
            reply,
        })
        .unwrap();
    recv_within(joined, "the runner's id");
    store_gate.wait_entered("the commit of the assignment");

    // A status question (which stages nothing) has the core reading the database when the
    // commit ends and the store thread's wake-up arrives: the core takes that wake-up with
    // the same batch as the question.
    read_gate.arm();
    let (reply, status) = oneshot::channel();
    core.events
        .send(Event::Client {
            req: ToDispatcher::Status,
            reply,
        })
        .unwrap();
    read_gate.wait_entered("the status question's read");
    store_gate.open();
    woke.recv_timeout(WAIT).expect("the store thread's wake-up");
    read_gate.open();
    recv_within(status, "the status answer");

    match next_to_runner(&mut to_runner, Duration::from_secs(5)) {
        Some(FromDispatcher::Assign { commit: c, .. }) => assert_eq!(c, commit(1)),
        other => panic!("the durable assignment was not sent: {other:?}"),
    }
}

/// A submission whose transaction fails took effect all the same (its op stays staged and
/// is committed by the retry), so its sender must not hear "refused": it hears that it is
/// not recorded yet. (It heard the dispatcher refused, exit 70, and the commit ran later.)
#[test]
fn a_submission_whose_commit_fails_is_told_not_recorded_and_recorded_by_the_retry() {
    let store_gate = GateControl::new();
    let core = start(
        store_gate.gate.clone(),
        GateControl::new().gate,
        mpsc::channel().0,
    );
    core.fail.store(true, Ordering::SeqCst);
    match core.submit(vec![commit(1)]) {
        FromDispatcher::NotRecorded { reason } => {
            assert!(reason.contains("write lock"), "{reason}");
        }
        other => panic!("expected NotRecorded, got {other:?}"),
    }
    // While the database cannot be written, new submissions are refused outright: nothing
    // of them is taken, so the refusal waits for no try of the database (here, one held
    // at the gate).
    store_gate.arm();
    store_gate.wait_entered("the store's next try");
    let answer = core.send_submit(vec![commit(2)]);
    let (tx, refused) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(answer.blocking_recv());
    });
    match refused.recv_timeout(Duration::from_secs(3)) {
        Ok(Ok(FromDispatcher::Error { reason })) => {
            assert!(reason.contains("cannot record new commits"), "{reason}");
        }
        other => panic!("expected a refusal at once, got {other:?}"),
    }
    core.fail.store(false, Ordering::SeqCst);
    store_gate.open();

    let reader = SqliteReader::open(core.dir.path()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let queue: Vec<CommitId> = reader
            .queue()
            .unwrap()
            .into_iter()
            .map(|r| r.commit)
            .collect();
        if queue == vec![commit(1)] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retry did not record the first submission: the queue is {queue:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Sending it again is safe: known, not queued twice.
    assert_eq!(
        core.submit(vec![commit(1)]),
        FromDispatcher::Submitted {
            queued: 0,
            known: 1
        }
    );
}

/// A stop while the database cannot be written does not try it again, neither the core
/// (waiting for one more answer) nor the store thread as it closes: each try waits out the
/// database's busy timeout (5 s) when another program holds the lock. (Ctrl-C took 12 to
/// 15 s then, and said "stopping with changes the database could not record" twice.)
#[test]
fn a_stop_while_the_database_fails_does_not_try_it_again() {
    let mut core = start(
        GateControl::new().gate,
        GateControl::new().gate,
        mpsc::channel().0,
    );
    core.fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        core.submit(vec![commit(1)]),
        FromDispatcher::NotRecorded { .. }
    ));
    // The core knows of the trouble (it answered from it); a retry timer may add one try.
    let before = core.tries.load(Ordering::SeqCst);
    core.events.send(Event::Shutdown).unwrap();
    core.thread.take().unwrap().join().unwrap();
    let after = core.tries.load(Ordering::SeqCst);
    assert!(
        after <= before + 1,
        "{} more commit tries after the stop",
        after - before
    );
}
