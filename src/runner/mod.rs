//! The test runner: holds a port in its range as its identity, registers with the
//! dispatcher, and runs one job at a time, streaming the output back.
//!
//! The connection to the dispatcher is served by one loop that never waits on the job, so
//! heartbeats are answered however busy the steps keep the machine. A job outlives its
//! connection: when the dispatcher goes away the runner keeps running (and keeps the job's
//! output and result), reconnects with backoff, announces the job when it registers again,
//! and resends from the offset the dispatcher names — or drops the job if told to.
//!
//! A job that cannot be carried out for a reason that is not the commit's (checkout
//! failed, origin unreachable, the runner is stopping) is handed back
//! ([`ToDispatcher::GiveBack`]), never reported as a result. While its origin is
//! unreachable the runner pauses: it tells the dispatcher to assign it nothing, and probes
//! the origin with backoff until it answers.
//!
//! Stopping: the first SIGTERM/Ctrl-C drains — no new job, the running one finishes (its
//! checkout is not waited for) and is reported, then the runner says goodbye and exits. A
//! second signal, or `--drain-timeout`, kills the job's steps and hands the commit back
//! uncounted.
//!
//! Partitions: a runner that hears nothing from the dispatcher (pings included) for twice
//! the heartbeat timeout the dispatcher announced drops the connection and connects again.

pub mod job;
pub mod supervisor;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tinyci_proto::{
    CommitId, Connection, FromDispatcher, FromRunner, GiveBackCause, HeldJob, HeldVerdict, JobId,
    ProtoError, Role, RunReport, ToDispatcher, ToRunner, HANDSHAKE_TIMEOUT,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use self::job::{InfraFailure, JobEvent};
use crate::git::Workspace;
use crate::net::{self, Backoff, Transport};
use crate::shutdown::Shutdown;

/// Default cap on one job's output; the rest is discarded with a marker line.
pub const DEFAULT_OUTPUT_CAP: u64 = 16 * 1024 * 1024;

/// Default bound on how long a stopping runner waits for its running job.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// Log frames carry at most this much output.
const MAX_LOG_CHUNK: usize = 1024 * 1024;

/// How long a stopping runner waits for its job's processes to be killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes of an unreachable origin start this often and back off to [`PROBE_MAX`].
const PROBE_MIN: Duration = Duration::from_millis(500);
const PROBE_MAX: Duration = Duration::from_secs(30);

/// What a paused runner says when asked why while it stops.
const STOPPING: &str = "the runner is stopping";

/// Runner settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The runner's own clone, where commits are checked out and steps run.
    pub repo: PathBuf,
    /// The dispatcher's `host:port`.
    pub dispatcher: String,
    /// The shared secret, if any.
    pub token: Option<String>,
    /// Most output kept per job.
    pub output_cap: u64,
    /// How long a drain (first signal) waits for the running job before stopping it.
    pub drain_timeout: Duration,
    /// How the clone may be treated, and the deadlines of fetches.
    pub workspace: crate::git::WorkspaceOptions,
}

/// Why a runner could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The clone is unusable.
    #[error("{0}")]
    Repo(#[from] crate::git::GitError),
    /// The listener has no address.
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
    /// The dispatcher refused us for good (token, protocol version), or is not one.
    #[error("cannot work with the dispatcher: {0}")]
    Dispatcher(#[source] net::NetError),
}

/// Keeps the steps this runner will run (processes of the same user) out of its memory:
/// with `PR_SET_DUMPABLE` off, they can neither ptrace the runner nor read its
/// `/proc/PID/environ`, where `TINYCI_TOKEN` may be. (Steps exec a new program, so they are
/// dumpable as usual.) Call it first thing in `main`.
pub fn harden_process() {
    // SAFETY: prctl(2) with plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        eprintln!(
            "warning: cannot make the runner non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// What carries the runner's jobs out. [`InClone`] is the real one; the connection loop's
/// tests put a scripted one in its place, so they need neither a clone nor steps.
trait Work: Send + Sync + 'static {
    /// Starts the job for `commit`: it sends output and then exactly one
    /// [`JobEvent::Finished`] or [`JobEvent::Infra`] on `events`, and ends soon after
    /// `cancel` is cancelled (as [`JobEvent::Infra`], [`job::STOPPED`]; or, when
    /// `cancelled_by_client` is set, as a `cancelled` report).
    fn start(
        &self,
        commit: CommitId,
        events: UnboundedSender<JobEvent>,
        cancel: CancellationToken,
        cancelled_by_client: Arc<std::sync::atomic::AtomicBool>,
    ) -> JoinHandle<()>;

    /// Checks whether the origin answers again (a paused runner probes it with backoff).
    fn probe_origin(&self, cancel: CancellationToken) -> JoinHandle<Result<(), String>>;
}

/// Jobs checked out in the runner's own clone, their steps run there ([`job::execute`]).
struct InClone {
    workspace: Arc<tokio::sync::Mutex<Workspace>>,
    output_cap: u64,
}

impl Work for InClone {
    fn start(
        &self,
        commit: CommitId,
        events: UnboundedSender<JobEvent>,
        cancel: CancellationToken,
        cancelled_by_client: Arc<std::sync::atomic::AtomicBool>,
    ) -> JoinHandle<()> {
        let span = tracing::info_span!("job", commit = %commit.short());
        tokio::spawn(
            job::execute(
                self.workspace.clone(),
                commit,
                self.output_cap,
                events,
                cancel,
                cancelled_by_client,
            )
            .instrument(span),
        )
    }

    fn probe_origin(&self, cancel: CancellationToken) -> JoinHandle<Result<(), String>> {
        let ws = self.workspace.clone();
        tokio::spawn(async move {
            let ws = ws.lock().await;
            ws.probe_origin(&cancel).await.map_err(|e| e.to_string())
        })
    }
}

/// How a job ended, as the runner will tell the dispatcher.
enum JobEnd {
    /// The commit's verdict.
    Report(RunReport),
    /// Not the commit's doing: the commit goes back to the queue.
    GiveBack {
        reason: String,
        cause: GiveBackCause,
    },
}

/// The job this runner holds, from assignment until the dispatcher acknowledges its result
/// (or it is handed back).
struct ActiveJob {
    id: JobId,
    commit: CommitId,
    events: UnboundedReceiver<JobEvent>,
    /// Every byte of output so far (bounded by the output cap), kept for resending.
    output: Vec<u8>,
    /// How much of `output` the dispatcher has (or has been sent on this connection).
    sent: usize,
    end: Option<JobEnd>,
    /// The checkout is done and the steps run (a drain waits for the job from then on).
    steps_started: bool,
    /// We cancelled the job because the runner stops: whatever its end, it is withdrawn.
    withdrawing: Option<Instant>,
    cancel: CancellationToken,
    /// A client cancelled the run: it ends as `cancelled`.
    cancelled_by_client: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl ActiveJob {
    fn start(work: &dyn Work, id: JobId, commit: CommitId, parent: &Shutdown) -> ActiveJob {
        let (tx, events) = unbounded_channel();
        let cancel = parent.child_token();
        let cancelled_by_client = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = work.start(
            commit.clone(),
            tx,
            cancel.clone(),
            cancelled_by_client.clone(),
        );
        ActiveJob {
            id,
            commit,
            events,
            output: Vec::new(),
            sent: 0,
            end: None,
            steps_started: false,
            withdrawing: None,
            cancel,
            cancelled_by_client,
            task,
        }
    }

    /// Takes one event of the job. Returns why the runner must pause, if the job found
    /// its origin unreachable.
    fn absorb(&mut self, ev: JobEvent) -> Option<String> {
        match ev {
            JobEvent::Output(bytes) => self.output.extend_from_slice(&bytes),
            JobEvent::StepsStarted => self.steps_started = true,
            JobEvent::Finished(report) => {
                info!(commit = %self.commit, status = ?report.status, "job finished");
                self.end = Some(JobEnd::Report(report));
            }
            JobEvent::Infra(InfraFailure { reason, cause, .. }) => {
                let cause = if self.withdrawing.is_some() {
                    GiveBackCause::Withdrawn
                } else {
                    cause
                };
                warn!(commit = %self.commit, reason, cause = ?cause, "the job could not be carried out; handing the commit back");
                let pause = (cause == GiveBackCause::OriginUnreachable)
                    .then(|| format!("origin unreachable ({reason})"));
                self.end = Some(JobEnd::GiveBack { reason, cause });
                return pause;
            }
        }
        None
    }

    /// Takes every event already waiting from the job; returns a pause reason as
    /// [`ActiveJob::absorb`] does.
    fn drain(&mut self) -> Option<String> {
        let mut pause = None;
        while self.end.is_none() {
            match self.events.try_recv() {
                Ok(ev) => pause = self.absorb(ev).or(pause),
                Err(_) => break,
            }
        }
        pause
    }

    fn held(&self) -> HeldJob {
        HeldJob {
            job: self.id,
            commit: self.commit.clone(),
            finished: self.end.is_some(),
        }
    }

    /// Kills the job's steps; it then ends (as withdrawn) on its own.
    fn withdraw(&mut self) {
        if self.withdrawing.is_none() {
            self.withdrawing = Some(Instant::now() + STOP_TIMEOUT);
        }
        self.cancel.cancel();
    }

    /// Kills the job's processes and waits (bounded) for it to end.
    async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(STOP_TIMEOUT, self.task).await;
    }
}

/// What the status port reports.
#[derive(Default)]
struct Status {
    connected: bool,
    commit: Option<CommitId>,
    paused: Option<String>,
}

/// The runner's origin did not answer: no jobs until it does.
struct Pause {
    reason: String,
    backoff: Backoff,
    next_probe: Instant,
    probe: Option<JoinHandle<Result<(), String>>>,
}

/// Runs the runner on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    mut config: Config,
    shutdown: Shutdown,
) -> Result<(), RunnerError> {
    let repo = config.repo.clone();
    let options = config.workspace.clone();
    let (workspace, leftovers) = tokio::task::spawn_blocking(move || {
        crate::git::Workspace::open(&repo, options).map(|ws| {
            let killed = job::kill_leftovers(ws.path());
            (ws, killed)
        })
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    // One spelling of the clone's path, so the leftover sweep recognises its own marker.
    config.repo = workspace.path().to_path_buf();
    if let crate::git::Origin::Local { objects, .. } = workspace.origin() {
        info!(objects = %objects.display(), "origin is local: its commits are read in place, without fetching");
    }
    let work = Arc::new(InClone {
        workspace: Arc::new(tokio::sync::Mutex::new(workspace)),
        output_cap: config.output_cap,
    });
    if leftovers > 0 {
        warn!(
            killed = leftovers,
            "killed processes an earlier runner on this clone left running"
        );
    }
    let addr = listener.local_addr()?.to_string();
    let status = Arc::new(Mutex::new(Status::default()));
    let status_task = tokio::spawn(serve_status(
        listener,
        addr.clone(),
        status.clone(),
        config.token.clone(),
        shutdown.clone(),
    ));
    info!(addr = %addr, repo = %config.repo.display(), dispatcher = %config.dispatcher, drain_timeout = ?config.drain_timeout, "listening");

    let (dispatcher, token) = (
        config.dispatcher.clone(),
        config.token.clone().unwrap_or_default(),
    );
    // TCP (connect timeout, keepalive, TCP_USER_TIMEOUT) stays out here, in
    // `net::connect`; the runner's loops speak to any `Transport`.
    let connect = move || {
        let (dispatcher, token) = (dispatcher.clone(), token.clone());
        async move { net::connect(&dispatcher, Role::Runner, &token).await }
    };
    let fatal = Runner::new(config, addr, work, status, shutdown)
        .run(connect)
        .await;
    status_task.abort();
    info!("stopped");
    fatal.map_or(Ok(()), Err)
}

/// A runner's state between and across connections.
struct Runner {
    config: Config,
    addr: String,
    work: Arc<dyn Work>,
    status: Arc<Mutex<Status>>,
    shutdown: Shutdown,
    job: Option<ActiveJob>,
    pause: Option<Pause>,
    /// Set when a drain began: when it gives up waiting for the job.
    drain_deadline: Option<Instant>,
    /// Between connection attempts; reset only by a successful registration (or when the
    /// dispatcher says it restarts).
    backoff: Backoff,
}

/// Why [`Runner::session`] ended without an error.
struct Stop;

impl Runner {
    fn new(
        config: Config,
        addr: String,
        work: Arc<dyn Work>,
        status: Arc<Mutex<Status>>,
        shutdown: Shutdown,
    ) -> Runner {
        Runner {
            config,
            addr,
            work,
            status,
            shutdown,
            job: None,
            pause: None,
            drain_deadline: None,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
        }
    }

    /// Serves the dispatcher through the connections `connect` makes (each one past its
    /// hello) until the runner is to exit, then stops a job still running. Returns why if
    /// that is an error (the dispatcher refused us for good).
    async fn run<S, C, F>(mut self, connect: C) -> Option<RunnerError>
    where
        S: Transport,
        C: FnMut() -> F,
        F: Future<Output = Result<Connection<S>, net::NetError>>,
    {
        let fatal = self.serve(connect).await;
        if let Some(j) = self.job.take() {
            info!(commit = %j.commit, "stopping the running job");
            j.stop().await;
        }
        fatal
    }

    /// Connects, serves and reconnects until the runner is to exit; returns why if that is
    /// an error (the dispatcher refused us for good).
    async fn serve<S, C, F>(&mut self, mut connect: C) -> Option<RunnerError>
    where
        S: Transport,
        C: FnMut() -> F,
        F: Future<Output = Result<Connection<S>, net::NetError>>,
    {
        loop {
            if self.done_offline() {
                return None;
            }
            let conn = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = self.shutdown.drain_requested(), if self.drain_deadline.is_none() => {
                    self.begin_drain();
                    continue;
                }
                _ = sleep_until(self.drain_deadline) => continue,
                res = connect() => res,
            };
            match conn {
                Ok(mut conn) => {
                    set_status(&self.status, |s| s.connected = true);
                    let res = self.session(&mut conn).await;
                    set_status(&self.status, |s| s.connected = false);
                    match res {
                        Ok(Stop) => return None,
                        Err(e) => {
                            warn!(dispatcher = %self.config.dispatcher, error = %e, "lost the dispatcher; reconnecting")
                        }
                    }
                }
                Err(e) if e.is_permanent() => return Some(RunnerError::Dispatcher(e)),
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "dispatcher unreachable; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = self.shutdown.drain_requested(), if self.drain_deadline.is_none() => self.begin_drain(),
                        _ = sleep_until(self.drain_deadline) => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Whether a runner without a connection should exit now: asked to stop, or draining
    /// with nothing left to deliver (or out of time to deliver it).
    fn done_offline(&mut self) -> bool {
        if self.shutdown.is_cancelled() {
            return true;
        }
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        if let Some(j) = self.job.as_mut() {
            if let Some(reason) = j.drain() {
                self.enter_pause(reason);
            }
        }
        match &self.job {
            None => true,
            // Nobody to hand it back to; the dispatcher requeues it when we do not return.
            Some(j) if matches!(j.end, Some(JobEnd::GiveBack { .. })) => true,
            Some(_) => Instant::now() >= deadline,
        }
    }

    /// Why the runner takes no job now, if it does not.
    fn unavailable(&self) -> Option<String> {
        if self.drain_deadline.is_some() || self.shutdown.is_draining() {
            Some(STOPPING.into())
        } else {
            self.pause.as_ref().map(|p| p.reason.clone())
        }
    }

    /// The first signal: no new job; the running one may finish within the drain timeout,
    /// unless its steps have not begun (then there is nothing to wait for).
    fn begin_drain(&mut self) {
        let deadline = Instant::now() + self.config.drain_timeout;
        self.drain_deadline = Some(deadline);
        set_status(&self.status, |s| s.paused = Some(STOPPING.into()));
        match self.job.as_mut() {
            None => info!("stopping: no job running"),
            Some(j) if j.end.is_some() => {
                info!(commit = %j.commit, "stopping once the finished job is delivered")
            }
            Some(j) if !j.steps_started => {
                info!(commit = %j.commit, "stopping: the job's steps have not begun; handing the commit back");
                j.withdraw();
            }
            Some(j) => {
                info!(commit = %j.commit, drain_timeout = ?self.config.drain_timeout, "draining: taking no new job; the running one may finish (a second signal stops it)")
            }
        }
    }

    fn enter_pause(&mut self, reason: String) {
        if self.pause.is_some() {
            return;
        }
        warn!(reason, "pausing: no jobs until the origin answers again");
        let mut backoff = Backoff::new(PROBE_MIN, PROBE_MAX);
        let next_probe = Instant::now() + backoff.next_delay();
        set_status(&self.status, |s| s.paused = Some(reason.clone()));
        self.pause = Some(Pause {
            reason,
            backoff,
            next_probe,
            probe: None,
        });
    }

    /// One connection to the dispatcher: register, resend what it lacks, then serve until
    /// the connection ends (`Err`) or the runner is to exit (`Ok`).
    async fn session(&mut self, conn: &mut Connection<impl Transport>) -> Result<Stop, ProtoError> {
        if let Some(j) = self.job.as_mut() {
            // Announce the job as it is now: a result that came in while we were away counts.
            if let Some(reason) = j.drain() {
                self.enter_pause(reason);
            }
        }
        conn.send(&ToDispatcher::Register {
            addr: self.addr.clone(),
            held: self.job.as_ref().map(ActiveJob::held),
            paused: self.unavailable(),
        })
        .await?;
        let (runner, verdict, heartbeat_timeout) = match conn
            .recv_within::<FromDispatcher>(HANDSHAKE_TIMEOUT, "the registration reply")
            .await?
        {
            FromDispatcher::Registered {
                runner,
                held,
                heartbeat_timeout,
            } => (runner, held, heartbeat_timeout),
            FromDispatcher::Error { reason } => return Err(ProtoError::Refused(reason)),
            other => {
                return Err(ProtoError::Violation(format!(
                    "expected Registered, got {other:?}"
                )))
            }
        };
        self.backoff.reset();
        // Twice the dispatcher's timeout: by then the dispatcher has given up on us anyway
        // (at 1x), while a busy dispatcher whose ping is merely late (a loaded machine, a
        // burst of output to write) does not cost the running job. A dispatcher could
        // announce nonsense; a deadline under a few frames' time would drop every
        // connection.
        let silence_limit = (heartbeat_timeout * 2).max(Duration::from_secs(1));
        info!(runner = %runner, dispatcher = %self.config.dispatcher, silence_limit = ?silence_limit, "registered");
        if let Some(j) = self.job.as_mut() {
            match verdict {
                Some(HeldVerdict::Adopt { log_offset }) => {
                    info!(commit = %j.commit, log_offset, "dispatcher adopted the running job");
                    j.sent = (log_offset as usize).min(j.output.len());
                }
                other => {
                    let reason = match other {
                        Some(HeldVerdict::Drop { reason }) => reason,
                        _ => "the dispatcher did not answer for it".into(),
                    };
                    warn!(commit = %j.commit, reason, "dropping the held job");
                    if let Some(j) = self.job.take() {
                        j.stop().await;
                    }
                    set_status(&self.status, |s| s.commit = None);
                }
            }
        }
        if self.flush_job(conn).await? {
            return Ok(Stop);
        }
        if self.drain_deadline.is_some() && self.job.is_none() {
            return self.goodbye(conn).await;
        }

        let silence = tokio::time::sleep(silence_limit);
        tokio::pin!(silence);
        loop {
            let withdraw_deadline = self
                .job
                .as_ref()
                .filter(|j| j.end.is_none())
                .and_then(|j| j.withdrawing);
            let drain_deadline = self.drain_deadline.filter(|_| {
                self.job
                    .as_ref()
                    .is_some_and(|j| j.end.is_none() && j.withdrawing.is_none())
            });
            tokio::select! {
                // Frames from the dispatcher first: after a long flush, a ping that waits
                // in the socket must count before the silence deadline is judged. (The
                // dispatcher sends little, so nothing else starves.)
                biased;
                msg = conn.recv::<FromDispatcher>() => {
                    silence.as_mut().reset(Instant::now() + silence_limit);
                    let Some(msg) = msg? else {
                        return Err(ProtoError::Closed);
                    };
                    if let Some(stop) = self.on_message(conn, msg).await? {
                        return Ok(stop);
                    }
                }
                _ = self.shutdown.cancelled(), if withdraw_deadline.is_none() => {
                    match self.job.as_mut() {
                        Some(j) if j.end.is_none() => {
                            info!(commit = %j.commit, "stopping: killing the job's steps and handing the commit back");
                            j.withdraw();
                        }
                        // Nothing running, or its end is already on the wire before our goodbye.
                        _ => return self.goodbye(conn).await,
                    }
                }
                _ = self.shutdown.drain_requested(), if self.drain_deadline.is_none() => {
                    self.begin_drain();
                    match &self.job {
                        None => return self.goodbye(conn).await,
                        Some(_) => conn.send(&ToDispatcher::Pause { reason: STOPPING.into() }).await?,
                    }
                }
                _ = sleep_until(drain_deadline) => {
                    if let Some(j) = self.job.as_mut() {
                        warn!(commit = %j.commit, drain_timeout = ?self.config.drain_timeout, "drain timeout: killing the job's steps and handing the commit back");
                        j.withdraw();
                    }
                }
                _ = sleep_until(withdraw_deadline) => {
                    // The job did not end after its steps were killed: hand it back anyway.
                    if let Some(j) = self.job.as_mut() {
                        warn!(commit = %j.commit, "the stopped job did not end in time; handing the commit back");
                        j.task.abort();
                        j.end = Some(JobEnd::GiveBack { reason: job::STOPPED.into(), cause: GiveBackCause::Withdrawn });
                    }
                    // A stopping runner's hand-back ends with its goodbye (in `flush_job`).
                    if self.flush_job(conn).await? {
                        return Ok(Stop);
                    }
                    return self.goodbye(conn).await;
                }
                res = probe_tick(&mut self.pause, self.work.as_ref(), &self.shutdown) => {
                    self.probed(conn, res).await?;
                }
                ev = job_event(&mut self.job) => {
                    let pause = self.job.as_mut().and_then(|j| j.absorb(ev));
                    if let Some(reason) = pause {
                        self.enter_pause(reason.clone());
                        conn.send(&ToDispatcher::Pause { reason }).await?;
                    }
                    if self.flush_job(conn).await? {
                        return Ok(Stop);
                    }
                }
                () = &mut silence => {
                    warn!(silence = ?silence_limit, "heard nothing from the dispatcher (pings included) for twice its heartbeat timeout; dropping the connection");
                    return Err(ProtoError::Timeout(silence_limit, "anything from the dispatcher"));
                }
            }
        }
    }

    /// Handles one message from the dispatcher; `Some(Stop)` when the runner is to exit.
    async fn on_message(
        &mut self,
        conn: &mut Connection<impl Transport>,
        msg: FromDispatcher,
    ) -> Result<Option<Stop>, ProtoError> {
        match msg {
            FromDispatcher::Ping { seq } => conn.send(&ToDispatcher::Pong { seq }).await?,
            FromDispatcher::Assign { job: id, commit } => {
                if let Some(j) = self.job.as_ref() {
                    warn!(busy_with = %j.commit, commit = %commit, "assigned a job while busy; ignoring");
                } else if let Some(reason) = self.unavailable() {
                    // The dispatcher had not yet heard that we pause: not our job to take.
                    info!(commit = %commit, reason, "assigned a job while taking none; handing it back");
                    conn.send(&ToDispatcher::GiveBack {
                        job: id,
                        reason: format!("the runner takes no job now: {reason}"),
                        cause: GiveBackCause::Withdrawn,
                    })
                    .await?;
                } else {
                    info!(commit = %commit, job = %id, "running");
                    set_status(&self.status, |s| s.commit = Some(commit.clone()));
                    self.job = Some(ActiveJob::start(
                        self.work.as_ref(),
                        id,
                        commit,
                        &self.shutdown,
                    ));
                }
            }
            FromDispatcher::ResultAck { job: id, accepted } => {
                if self.job.as_ref().is_some_and(|j| j.id == id) {
                    if accepted {
                        info!(job = %id, "result delivered");
                    } else {
                        warn!(job = %id, "dispatcher refused the result (attempt superseded)");
                    }
                    self.job = None;
                    set_status(&self.status, |s| s.commit = None);
                    if self.drain_deadline.is_some() {
                        return self.goodbye(conn).await.map(Some);
                    }
                }
            }
            FromDispatcher::Cancel { job: id } => match self.job.as_mut() {
                Some(j) if j.id == id && j.end.is_none() && j.withdrawing.is_none() => {
                    info!(commit = %j.commit, job = %id, "cancelled by a client; stopping the steps");
                    j.cancelled_by_client
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    j.cancel.cancel();
                }
                _ => info!(job = %id, "cancel of a job that is not running here; nothing to do"),
            },
            FromDispatcher::ShuttingDown => {
                // A restart: keep the job, and come back as soon as it listens again.
                info!("the dispatcher is shutting down; reconnecting");
                self.backoff.reset();
                return Err(ProtoError::Closed);
            }
            FromDispatcher::Error { reason } => return Err(ProtoError::Refused(reason)),
            other => return Err(ProtoError::Violation(format!("unexpected {other:?}"))),
        }
        Ok(None)
    }

    /// The outcome of a probe of the unreachable origin.
    async fn probed(
        &mut self,
        conn: &mut Connection<impl Transport>,
        res: Result<(), String>,
    ) -> Result<(), ProtoError> {
        match res {
            Ok(()) => {
                info!("origin answers again; taking jobs");
                self.pause = None;
                set_status(&self.status, |s| s.paused = None);
                if self.unavailable().is_none() {
                    conn.send(&ToDispatcher::Resume).await?;
                }
            }
            Err(error) => {
                if let Some(p) = self.pause.as_mut() {
                    let delay = p.backoff.next_delay();
                    p.next_probe = Instant::now() + delay;
                    warn!(error, retry_in = ?delay, "origin still unreachable; still paused");
                }
            }
        }
        Ok(())
    }

    /// Sends the job's output the dispatcher lacks and, once it ended, its result or its
    /// hand-back. Returns `true` when the runner is to exit (a stopping runner's job was
    /// handed back).
    async fn flush_job(
        &mut self,
        conn: &mut Connection<impl Transport>,
    ) -> Result<bool, ProtoError> {
        let Some(j) = self.job.as_mut() else {
            return Ok(false);
        };
        if let Some(reason) = j.drain() {
            self.enter_pause(reason.clone());
            conn.send(&ToDispatcher::Pause { reason }).await?;
        }
        let Some(j) = self.job.as_mut() else {
            return Ok(false);
        };
        flush(conn, j).await?;
        if let Some(JobEnd::GiveBack { .. }) = j.end {
            // Handed back: the dispatcher has it; nothing of it is ours any more.
            self.job = None;
            set_status(&self.status, |s| s.commit = None);
            if self.drain_deadline.is_some() || self.shutdown.is_cancelled() {
                self.goodbye(conn).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The last frame of a runner that stops on purpose.
    async fn goodbye(&mut self, conn: &mut Connection<impl Transport>) -> Result<Stop, ProtoError> {
        info!("saying goodbye to the dispatcher");
        conn.send(&ToDispatcher::Goodbye {
            reason: STOPPING.into(),
        })
        .await?;
        Ok(Stop)
    }
}

/// Sleeps until `deadline`, or for ever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Runs the next probe of a paused runner's origin when it is due; pending for ever when
/// the runner is not paused. Cancel-safe: a probe in flight is kept in `pause`.
async fn probe_tick(
    pause: &mut Option<Pause>,
    work: &dyn Work,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let Some(p) = pause.as_mut() else {
        return std::future::pending().await;
    };
    if p.probe.is_none() {
        tokio::time::sleep_until(p.next_probe).await;
        p.probe = Some(work.probe_origin(shutdown.child_token()));
    }
    let res = match p.probe.as_mut() {
        Some(handle) => handle.await,
        None => return std::future::pending().await,
    };
    p.probe = None;
    res.unwrap_or_else(|e| Err(format!("the probe task failed: {e}")))
}

fn set_status(status: &Mutex<Status>, f: impl FnOnce(&mut Status)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

/// Waits for the next event of the job, or forever when there is none to wait for.
async fn job_event(job: &mut Option<ActiveJob>) -> JobEvent {
    match job {
        Some(j) if j.end.is_none() => match j.events.recv().await {
            Some(ev) => ev,
            // The job task ended without saying how: it panicked, or was aborted.
            None => JobEvent::Infra(InfraFailure {
                reason: "the runner's job task crashed".into(),
                cause: GiveBackCause::Infrastructure,
                steps: Vec::new(),
            }),
        },
        _ => std::future::pending().await,
    }
}

/// Sends the output the dispatcher does not have yet and, once the job ended, its result
/// or its hand-back.
async fn flush(conn: &mut Connection<impl Transport>, j: &mut ActiveJob) -> Result<(), ProtoError> {
    while j.sent < j.output.len() {
        let end = (j.sent + MAX_LOG_CHUNK).min(j.output.len());
        conn.send(&ToDispatcher::Log {
            job: j.id,
            offset: j.sent as u64,
            data: j.output[j.sent..end].to_vec(),
        })
        .await?;
        j.sent = end;
    }
    match &j.end {
        Some(JobEnd::Report(report)) => {
            conn.send(&ToDispatcher::Done {
                job: j.id,
                report: report.clone(),
                log_len: j.output.len() as u64,
            })
            .await?
        }
        Some(JobEnd::GiveBack { reason, cause }) => {
            conn.send(&ToDispatcher::GiveBack {
                job: j.id,
                reason: reason.clone(),
                cause: *cause,
            })
            .await?
        }
        None => {}
    }
    Ok(())
}

/// Status connections served at once, at most; more are closed on arrival.
const MAX_STATUS_CONNECTIONS: usize = 64;

/// A status connection's whole exchange (hello, request, answer) must fit in this.
const STATUS_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers status queries on the runner's own port.
async fn serve_status(
    listener: TcpListener,
    addr: String,
    status: Arc<Mutex<Status>>,
    token: Option<String>,
    shutdown: Shutdown,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_STATUS_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            res = listener.accept() => match res {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(peer = %peer, "too many status connections; closing this one");
            continue;
        };
        let (addr, status, token) = (addr.clone(), status.clone(), token.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = Connection::new(stream);
            // The whole exchange is bounded: a peer that stops reading cannot hold it.
            let res = tokio::time::timeout(STATUS_EXCHANGE_TIMEOUT, async {
                conn.server_handshake(&[Role::Client], token.as_deref())
                    .await?;
                let ToRunner::Status = conn
                    .recv_within::<ToRunner>(HANDSHAKE_TIMEOUT, "a status request")
                    .await?;
                let (connected, commit, paused) = status
                    .lock()
                    .map(|s| (s.connected, s.commit.clone(), s.paused.clone()))
                    .unwrap_or((false, None, None));
                conn.send(&FromRunner::Status {
                    addr,
                    connected,
                    commit,
                    paused,
                })
                .await
            })
            .await
            .unwrap_or_else(|_| {
                Err(ProtoError::Violation(format!(
                    "no complete exchange within {STATUS_EXCHANGE_TIMEOUT:?}"
                )))
            });
            if let Err(e) = res {
                warn!(peer = %peer, error = %e, "status request failed");
            }
        });
    }
}

#[cfg(test)]
mod conn_tests;
