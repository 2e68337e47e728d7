//! In-process tests of the runner's connection loop ([`Runner::run`]) over
//! `tokio::io::duplex` pipes, with time paused: the read deadline, reconnecting and the
//! drain, without a socket, a clone, a step or a real sleep.
//!
//! The test plays the dispatcher on the far end of each pipe the runner "connects" (real
//! hello, real messages, pings every heartbeat interval) and scripts the runner's job
//! through a [`Work`] whose events it sends itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tinyci_proto::{
    CommitId, Connection, FromDispatcher, GiveBackCause, JobId, ProtoError, Role, RunReport,
    RunStatus, RunnerId, StepReport, StepStatus, ToDispatcher,
};
use tokio::io::DuplexStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::job::{InfraFailure, JobEvent, STOPPED};
use super::{Config, Runner, RunnerError, Status, Work, STOPPING, STOP_TIMEOUT};
use crate::net::NetError;
use crate::shutdown::Shutdown;

const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// What the fake dispatcher announces; the runner's read deadline is twice this.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
const PIPE: usize = 64 * 1024;
/// How long (in paused time) a test waits for something before it fails.
const PATIENCE: Duration = Duration::from_secs(300);

/// A job the runner started, as the test drives it.
struct ScriptedJob {
    commit: CommitId,
    events: UnboundedSender<JobEvent>,
    cancel: CancellationToken,
}

/// Jobs that do nothing by themselves: the test sends their events. A cancelled job ends
/// as the real one does (handed back as stopped) unless it is one that ignores it.
struct ScriptedWork {
    started: UnboundedSender<ScriptedJob>,
    obeys_cancel: bool,
}

impl Work for ScriptedWork {
    fn start(
        &self,
        commit: CommitId,
        events: UnboundedSender<JobEvent>,
        cancel: CancellationToken,
        _cancelled_by_client: Arc<std::sync::atomic::AtomicBool>,
    ) -> JoinHandle<()> {
        let _ = self.started.send(ScriptedJob {
            commit,
            events: events.clone(),
            cancel: cancel.clone(),
        });
        let obeys = self.obeys_cancel;
        tokio::spawn(async move {
            cancel.cancelled().await;
            if obeys {
                let _ = events.send(JobEvent::Infra(InfraFailure {
                    reason: STOPPED.into(),
                    cause: GiveBackCause::Infrastructure,
                    steps: Vec::new(),
                }));
            } else {
                std::future::pending::<()>().await;
            }
        })
    }

    fn probe_origin(&self, _cancel: CancellationToken) -> JoinHandle<Result<(), String>> {
        tokio::spawn(async { Err("no origin in these tests".to_string()) })
    }
}

/// A runner on its loop, and the test's handles on it.
struct Harness {
    shutdown: Shutdown,
    runner: JoinHandle<Option<RunnerError>>,
    /// The far ends of the connections the runner makes, in order.
    dials: UnboundedReceiver<DuplexStream>,
    jobs: UnboundedReceiver<ScriptedJob>,
}

fn start_runner(drain_timeout: Duration, obeys_cancel: bool) -> Harness {
    let shutdown = Shutdown::new();
    let (started, jobs) = unbounded_channel();
    let (dialed, dials) = unbounded_channel();
    let config = Config {
        repo: "unused-by-the-loop".into(),
        dispatcher: "pipe".into(),
        token: None,
        output_cap: 1 << 20,
        drain_timeout,
        workspace: Default::default(),
    };
    let work = Arc::new(ScriptedWork {
        started,
        obeys_cancel,
    });
    let status = Arc::new(Mutex::new(Status::default()));
    // Each connection is a fresh pipe whose far end goes to the test; the hello is the
    // real one.
    let connect = move || {
        let dialed: UnboundedSender<DuplexStream> = dialed.clone();
        async move {
            let (ours, theirs) = tokio::io::duplex(PIPE);
            let _ = dialed.send(theirs);
            let mut conn = Connection::new(ours);
            conn.client_handshake(Role::Runner, "")
                .await
                .map_err(|source| NetError::Handshake {
                    addr: "pipe".into(),
                    source,
                })?;
            Ok(conn)
        }
    };
    let runner = tokio::spawn(
        Runner::new(
            config,
            "runner-1:8900".into(),
            work,
            status,
            shutdown.clone(),
        )
        .run(connect),
    );
    Harness {
        shutdown,
        runner,
        dials,
        jobs,
    }
}

/// The dispatcher's end of one runner connection: pings every heartbeat interval while the
/// test waits for the runner's messages, unless it plays a silent dispatcher.
struct FakeDispatcher {
    conn: Connection<DuplexStream>,
    ping: Interval,
    seq: u64,
}

/// The far end of the runner's next connection.
async fn dialed(h: &mut Harness) -> DuplexStream {
    tokio::time::timeout(PATIENCE, h.dials.recv())
        .await
        .expect("the runner connects")
        .expect("the runner is alive")
}

impl FakeDispatcher {
    /// Waits for the runner's next connection, welcomes it and registers it.
    async fn accept(h: &mut Harness) -> FakeDispatcher {
        Self::register(dialed(h).await).await
    }

    /// Welcomes the runner on `stream` and registers it.
    async fn register(stream: DuplexStream) -> FakeDispatcher {
        let mut conn = Connection::new(stream);
        conn.server_handshake(&[Role::Runner], None)
            .await
            .expect("the runner's hello");
        match conn.recv_within::<ToDispatcher>(PATIENCE, "Register").await {
            Ok(ToDispatcher::Register { addr, .. }) => assert_eq!(addr, "runner-1:8900"),
            other => panic!("expected Register, got {other:?}"),
        }
        conn.send(&FromDispatcher::Registered {
            runner: RunnerId(1),
            held: None,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
        })
        .await
        .expect("Registered sent");
        let mut ping = tokio::time::interval(HEARTBEAT_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        FakeDispatcher { conn, ping, seq: 0 }
    }

    async fn send(&mut self, msg: FromDispatcher) {
        self.conn.send(&msg).await.expect("the runner reads");
    }

    /// The runner's next message other than a pong (checked against our pings), pinging
    /// meanwhile; `None` when the runner closed the connection.
    async fn next(&mut self) -> Option<ToDispatcher> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            tokio::select! {
                _ = self.ping.tick() => {
                    self.seq += 1;
                    if self.conn.send(&FromDispatcher::Ping { seq: self.seq }).await.is_err() {
                        return None;
                    }
                }
                msg = self.conn.recv::<ToDispatcher>() => match msg {
                    Ok(Some(ToDispatcher::Pong { seq })) => {
                        assert!(seq <= self.seq, "pong {seq} for a ping never sent");
                    }
                    Ok(Some(msg)) => return Some(msg),
                    Ok(None) | Err(ProtoError::Io(_)) => return None,
                    Err(e) => panic!("the runner broke the protocol: {e}"),
                },
                () = tokio::time::sleep_until(deadline) => panic!("nothing from the runner within {PATIENCE:?}"),
            }
        }
    }

    /// Pings for `period`, failing on any message from the runner but pongs.
    async fn only_pongs_for(&mut self, period: Duration) {
        let until = Instant::now() + period;
        loop {
            tokio::select! {
                _ = self.ping.tick() => {
                    self.seq += 1;
                    self.conn.send(&FromDispatcher::Ping { seq: self.seq }).await.expect("ping sent");
                }
                msg = self.conn.recv::<ToDispatcher>() => match msg {
                    Ok(Some(ToDispatcher::Pong { .. })) => {}
                    other => panic!("expected only pongs, got {other:?}"),
                },
                () = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

fn commit() -> CommitId {
    CommitId::parse(&"c0".repeat(20)).expect("valid id")
}

/// The first output of every scripted job.
const FIRST_LINE: &[u8] = b"[test] first line\n";

/// Assigns a job and returns it once the runner started it and knows its steps began (it
/// sent the output that follows: a drain waits only for a job past its checkout).
async fn assign(h: &mut Harness, d: &mut FakeDispatcher) -> (JobId, ScriptedJob) {
    let id = JobId::new();
    d.send(FromDispatcher::Assign {
        job: id,
        commit: commit(),
    })
    .await;
    let job = tokio::time::timeout(PATIENCE, h.jobs.recv())
        .await
        .expect("the runner starts the job")
        .expect("the runner is alive");
    assert_eq!(job.commit, commit());
    for ev in [
        JobEvent::StepsStarted,
        JobEvent::Output(FIRST_LINE.to_vec()),
    ] {
        job.events.send(ev).expect("the runner listens to its job");
    }
    assert_eq!(
        d.next().await,
        Some(ToDispatcher::Log {
            job: id,
            offset: 0,
            data: FIRST_LINE.to_vec()
        })
    );
    (id, job)
}

/// Starts a drain and waits until the dispatcher hears that the runner takes no new job.
async fn drain(h: &Harness, d: &mut FakeDispatcher) {
    h.shutdown.request_drain();
    assert_eq!(
        d.next().await,
        Some(ToDispatcher::Pause {
            reason: STOPPING.into()
        })
    );
}

/// The end of a stopping runner's conversation: goodbye, close, and a clean exit.
async fn expect_goodbye(h: Harness, d: &mut FakeDispatcher) {
    assert_eq!(
        d.next().await,
        Some(ToDispatcher::Goodbye {
            reason: STOPPING.into()
        })
    );
    assert_eq!(d.next().await, None, "the runner closes after its goodbye");
    let fatal = tokio::time::timeout(PATIENCE, h.runner)
        .await
        .expect("the runner exits")
        .expect("the runner did not panic");
    assert!(fatal.is_none(), "the runner exits cleanly: {fatal:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_dispatcher_is_dropped_after_twice_its_heartbeat_timeout_and_redialed() {
    let mut h = start_runner(Duration::from_secs(600), true);
    let mut first = FakeDispatcher::accept(&mut h).await;
    let registered = Instant::now();
    // This dispatcher says nothing more, pings included, and does not close: a partition
    // that swallows everything.
    let redial = dialed(&mut h).await;
    let after = registered.elapsed();
    let deadline = HEARTBEAT_TIMEOUT * 2;
    assert!(
        after >= deadline && after < deadline + HEARTBEAT_INTERVAL,
        "the runner redialed {after:?} after registering; its read deadline is {deadline:?}"
    );
    assert!(
        matches!(first.conn.recv::<ToDispatcher>().await, Ok(None)),
        "the runner closed the silent connection"
    );
    // The new connection is a full registration again, and stays.
    let mut second = FakeDispatcher::register(redial).await;
    second.only_pongs_for(HEARTBEAT_TIMEOUT * 4).await;
    assert!(h.dials.try_recv().is_err(), "no further reconnect");
}

#[tokio::test(start_paused = true)]
async fn a_dispatcher_that_pings_keeps_the_runner() {
    let mut h = start_runner(Duration::from_secs(600), true);
    let mut d = FakeDispatcher::accept(&mut h).await;
    // Far past the read deadline, with pings: the runner answers and stays.
    d.only_pongs_for(HEARTBEAT_TIMEOUT * 20).await;
    assert!(h.dials.try_recv().is_err(), "the runner redialed");
    assert!(d.seq >= 60, "only {} pings", d.seq);
    assert!(!h.runner.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_drain_lets_the_running_job_finish_then_reports_it_and_says_goodbye() {
    let drain_timeout = Duration::from_secs(600);
    let mut h = start_runner(drain_timeout, true);
    let mut d = FakeDispatcher::accept(&mut h).await;
    let (id, job) = assign(&mut h, &mut d).await;
    drain(&h, &mut d).await;
    // A long job: the runner waits for it (well within the drain timeout), answering pings.
    d.only_pongs_for(Duration::from_secs(120)).await;
    assert!(!job.cancel.is_cancelled(), "a drain stopped the job early");
    let report = RunReport {
        status: RunStatus::Success,
        steps: vec![StepReport {
            name: "test".into(),
            status: StepStatus::Success,
            exit_code: Some(0),
            duration_ms: 120_000,
        }],
        error: None,
    };
    job.events
        .send(JobEvent::Finished(report.clone()))
        .expect("the runner listens to its job");
    assert_eq!(
        d.next().await,
        Some(ToDispatcher::Done {
            job: id,
            report,
            log_len: FIRST_LINE.len() as u64
        })
    );
    d.send(FromDispatcher::ResultAck {
        job: id,
        accepted: true,
    })
    .await;
    expect_goodbye(h, &mut d).await;
}

#[tokio::test(start_paused = true)]
async fn the_drain_timeout_hands_the_job_back_uncounted() {
    let drain_timeout = Duration::from_secs(30);
    let mut h = start_runner(drain_timeout, true);
    let mut d = FakeDispatcher::accept(&mut h).await;
    let (id, job) = assign(&mut h, &mut d).await;
    let drained = Instant::now();
    drain(&h, &mut d).await;
    // The job never ends by itself; the runner must not wait past the drain timeout.
    let msg = d.next().await;
    let after = drained.elapsed();
    assert_eq!(
        msg,
        Some(ToDispatcher::GiveBack {
            job: id,
            reason: STOPPED.into(),
            cause: GiveBackCause::Withdrawn,
        })
    );
    assert!(
        job.cancel.is_cancelled(),
        "the job's steps were not stopped"
    );
    assert!(
        after >= drain_timeout && after < drain_timeout + HEARTBEAT_INTERVAL,
        "handed back {after:?} into a {drain_timeout:?} drain"
    );
    expect_goodbye(h, &mut d).await;
}

#[tokio::test(start_paused = true)]
async fn a_second_signal_hands_the_job_back_at_once() {
    let mut h = start_runner(Duration::from_secs(600), true);
    let mut d = FakeDispatcher::accept(&mut h).await;
    let (id, job) = assign(&mut h, &mut d).await;
    drain(&h, &mut d).await;
    d.only_pongs_for(Duration::from_secs(10)).await;
    let stopped = Instant::now();
    h.shutdown.cancel();
    assert_eq!(
        d.next().await,
        Some(ToDispatcher::GiveBack {
            job: id,
            reason: STOPPED.into(),
            cause: GiveBackCause::Withdrawn,
        })
    );
    assert!(job.cancel.is_cancelled());
    assert!(
        stopped.elapsed() < HEARTBEAT_INTERVAL,
        "took {:?} after the second signal",
        stopped.elapsed()
    );
    expect_goodbye(h, &mut d).await;
}

#[tokio::test(start_paused = true)]
async fn a_stopped_job_that_does_not_end_is_handed_back_anyway() {
    let mut h = start_runner(Duration::from_secs(600), false);
    let mut d = FakeDispatcher::accept(&mut h).await;
    let (id, job) = assign(&mut h, &mut d).await;
    drain(&h, &mut d).await;
    let stopped = Instant::now();
    h.shutdown.cancel();
    assert_eq!(
        d.next().await,
        Some(ToDispatcher::GiveBack {
            job: id,
            reason: STOPPED.into(),
            cause: GiveBackCause::Withdrawn,
        })
    );
    assert!(job.cancel.is_cancelled());
    let after = stopped.elapsed();
    assert!(
        after >= STOP_TIMEOUT && after < STOP_TIMEOUT + HEARTBEAT_INTERVAL,
        "handed back {after:?} after the stop; the job gets {STOP_TIMEOUT:?} to end"
    );
    expect_goodbye(h, &mut d).await;
}
