//! The test runner: holds a port in its range as its identity, registers with the
//! dispatcher, and runs one job at a time, streaming the output back.
//!
//! The connection to the dispatcher is served by one loop that never waits on the job, so
//! heartbeats are answered however busy the steps keep the machine. A job outlives its
//! connection: when the dispatcher goes away the runner keeps running (and keeps the job's
//! output and result), reconnects with backoff, announces the job when it registers again,
//! and resends from the offset the dispatcher names — or drops the job if told to.

pub mod job;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tinyci_proto::{
    CommitId, Connection, FromDispatcher, FromRunner, HeldJob, HeldVerdict, JobId, ProtoError,
    Role, RunReport, ToDispatcher, ToRunner, HANDSHAKE_TIMEOUT,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use self::job::JobEvent;
use crate::net::{self, Backoff};
use crate::shutdown::Shutdown;

/// Default cap on one job's output; the rest is discarded with a marker line.
pub const DEFAULT_OUTPUT_CAP: u64 = 16 * 1024 * 1024;

/// Log frames carry at most this much output.
const MAX_LOG_CHUNK: usize = 1024 * 1024;

/// How long a shutting-down runner waits for its job's processes to be killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// How the clone may be treated, and the deadlines of fetches.
    pub workspace: crate::git::WorkspaceOptions,
}

/// Why a runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The clone is unusable.
    #[error("{0}")]
    Repo(#[from] crate::git::GitError),
    /// The listener has no address.
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
}

/// The job this runner holds, from assignment until the dispatcher acknowledges its result.
struct ActiveJob {
    id: JobId,
    commit: CommitId,
    events: UnboundedReceiver<JobEvent>,
    /// Every byte of output so far (bounded by the output cap), kept for resending.
    output: Vec<u8>,
    /// How much of `output` the dispatcher has (or has been sent on this connection).
    sent: usize,
    report: Option<RunReport>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl ActiveJob {
    fn start(
        config: &Config,
        workspace: &Arc<tokio::sync::Mutex<crate::git::Workspace>>,
        id: JobId,
        commit: CommitId,
        parent: &Shutdown,
    ) -> ActiveJob {
        let (tx, events) = unbounded_channel();
        let cancel = parent.child_token();
        let span = tracing::info_span!("job", commit = %commit.short());
        let task = tokio::spawn(
            job::execute(
                workspace.clone(),
                commit.clone(),
                config.output_cap,
                tx,
                cancel.clone(),
            )
            .instrument(span),
        );
        ActiveJob {
            id,
            commit,
            events,
            output: Vec::new(),
            sent: 0,
            report: None,
            cancel,
            task,
        }
    }

    /// Takes every event already waiting from the job.
    fn drain(&mut self) {
        while self.report.is_none() {
            match self.events.try_recv() {
                Ok(JobEvent::Output(bytes)) => self.output.extend_from_slice(&bytes),
                Ok(JobEvent::Finished(report)) => self.report = Some(report),
                Ok(JobEvent::Infra(failure)) => self.report = Some(infra_report(failure)),
                Err(_) => break,
            }
        }
    }

    fn held(&self) -> HeldJob {
        HeldJob {
            job: self.id,
            commit: self.commit.clone(),
            finished: self.report.is_some(),
        }
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
    let workspace = Arc::new(tokio::sync::Mutex::new(workspace));
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
    info!(addr = %addr, repo = %config.repo.display(), dispatcher = %config.dispatcher, "listening");

    let token = config.token.clone().unwrap_or_default();
    let mut job: Option<ActiveJob> = None;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    while !shutdown.is_cancelled() {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            res = net::connect(&config.dispatcher, Role::Runner, &token) => res,
        };
        match conn {
            Ok(mut conn) => {
                backoff.reset();
                set_status(&status, |s| s.connected = true);
                let res = session(
                    &mut conn, &addr, &workspace, &config, &mut job, &status, &shutdown,
                )
                .await;
                set_status(&status, |s| s.connected = false);
                match res {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(dispatcher = %config.dispatcher, error = %e, "lost the dispatcher; reconnecting")
                    }
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "dispatcher unreachable");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if let Some(j) = job.take() {
        info!(commit = %j.commit, "stopping the running job");
        j.stop().await;
    }
    status_task.abort();
    Ok(())
}

fn set_status(status: &Mutex<Status>, f: impl FnOnce(&mut Status)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

enum Next {
    Stop,
    Msg(Result<Option<FromDispatcher>, ProtoError>),
    Job(JobEvent),
}

/// Waits for the next event of the job, or forever when there is none to wait for.
async fn job_event(job: &mut Option<ActiveJob>) -> JobEvent {
    match job {
        Some(j) if j.report.is_none() => match j.events.recv().await {
            Some(ev) => ev,
            // The job task ended without a result: it panicked.
            None => JobEvent::Finished(RunReport {
                status: tinyci_proto::RunStatus::Error,
                steps: Vec::new(),
                error: Some("the runner's job task crashed".into()),
            }),
        },
        _ => std::future::pending().await,
    }
}

/// One connection to the dispatcher: register, resend what it lacks, then serve until the
/// connection ends (`Err`) or shutdown (`Ok`).
async fn session(
    conn: &mut Connection<TcpStream>,
    addr: &str,
    workspace: &Arc<tokio::sync::Mutex<crate::git::Workspace>>,
    config: &Config,
    job: &mut Option<ActiveJob>,
    status: &Mutex<Status>,
    shutdown: &Shutdown,
) -> Result<(), ProtoError> {
    if let Some(j) = job.as_mut() {
        // Announce the job as it is now: a result that came in while we were away counts.
        j.drain();
    }
    conn.send(&ToDispatcher::Register {
        addr: addr.to_owned(),
        held: job.as_ref().map(ActiveJob::held),
    })
    .await?;
    let (runner, verdict) = match conn
        .recv_within::<FromDispatcher>(HANDSHAKE_TIMEOUT, "the registration reply")
        .await?
    {
        FromDispatcher::Registered { runner, held } => (runner, held),
        FromDispatcher::Error { reason } => return Err(ProtoError::Refused(reason)),
        other => {
            return Err(ProtoError::Violation(format!(
                "expected Registered, got {other:?}"
            )))
        }
    };
    info!(runner = %runner, dispatcher = %config.dispatcher, "registered");
    if let Some(j) = job.as_mut() {
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
                if let Some(j) = job.take() {
                    j.stop().await;
                }
                set_status(status, |s| s.commit = None);
            }
        }
    }
    if let Some(j) = job.as_mut() {
        flush(conn, j).await?;
    }

    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => Next::Stop,
            msg = conn.recv::<FromDispatcher>() => Next::Msg(msg),
            ev = job_event(job) => Next::Job(ev),
        };
        match next {
            Next::Stop => return Ok(()),
            Next::Msg(msg) => match msg? {
                None => return Err(ProtoError::Closed),
                Some(FromDispatcher::Ping { seq }) => {
                    conn.send(&ToDispatcher::Pong { seq }).await?
                }
                Some(FromDispatcher::Assign { job: id, commit }) => {
                    if let Some(j) = job.as_ref() {
                        warn!(busy_with = %j.commit, commit = %commit, "assigned a job while busy; ignoring");
                        continue;
                    }
                    info!(commit = %commit, job = %id, "running");
                    set_status(status, |s| s.commit = Some(commit.clone()));
                    *job = Some(ActiveJob::start(config, workspace, id, commit, shutdown));
                }
                Some(FromDispatcher::ResultAck { job: id, accepted }) => {
                    if job.as_ref().is_some_and(|j| j.id == id) {
                        if accepted {
                            info!(job = %id, "result delivered");
                        } else {
                            warn!(job = %id, "dispatcher refused the result (attempt superseded)");
                        }
                        *job = None;
                        set_status(status, |s| s.commit = None);
                    }
                }
                Some(FromDispatcher::Error { reason }) => return Err(ProtoError::Refused(reason)),
                Some(other) => return Err(ProtoError::Violation(format!("unexpected {other:?}"))),
            },
            Next::Job(ev) => {
                let Some(j) = job.as_mut() else { continue };
                match ev {
                    JobEvent::Output(bytes) => j.output.extend_from_slice(&bytes),
                    JobEvent::Infra(failure) => {
                        warn!(commit = %j.commit, reason = %failure.reason, "job not carried out");
                        j.report = Some(infra_report(failure));
                    }
                    JobEvent::Finished(report) => {
                        info!(commit = %j.commit, status = ?report.status, "job finished");
                        j.report = Some(report);
                    }
                }
                flush(conn, j).await?;
            }
        }
    }
}

/// Until the protocol can hand a commit back, an infrastructure failure is reported as an
/// `error` run that says so.
fn infra_report(failure: job::InfraFailure) -> RunReport {
    RunReport {
        status: tinyci_proto::RunStatus::Error,
        steps: Vec::new(),
        error: Some(format!("infrastructure: {}", failure.reason)),
    }
}

/// Sends the output the dispatcher does not have yet and, once the job ended, its result.
async fn flush(conn: &mut Connection<TcpStream>, j: &mut ActiveJob) -> Result<(), ProtoError> {
    // Coalesce whatever output is already waiting into as few frames as possible.
    j.drain();
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
    if let Some(report) = &j.report {
        conn.send(&ToDispatcher::Done {
            job: j.id,
            report: report.clone(),
            log_len: j.output.len() as u64,
        })
        .await?;
    }
    Ok(())
}

/// Answers status queries on the runner's own port.
async fn serve_status(
    listener: TcpListener,
    addr: String,
    status: Arc<Mutex<Status>>,
    token: Option<String>,
    shutdown: Shutdown,
) {
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
        let (addr, status, token) = (addr.clone(), status.clone(), token.clone());
        tokio::spawn(async move {
            let mut conn = Connection::new(stream);
            let res = async {
                conn.server_handshake(&[Role::Client], token.as_deref())
                    .await?;
                let ToRunner::Status = conn
                    .recv_within::<ToRunner>(HANDSHAKE_TIMEOUT, "a status request")
                    .await?;
                let (connected, commit) = status
                    .lock()
                    .map(|s| (s.connected, s.commit.clone()))
                    .unwrap_or((false, None));
                conn.send(&FromRunner::Status {
                    addr,
                    connected,
                    commit,
                })
                .await
            }
            .await;
            if let Err(e) = res {
                warn!(peer = %peer, error = %e, "status request failed");
            }
        });
    }
}
