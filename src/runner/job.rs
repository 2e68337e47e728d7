//! One job on a runner: check the commit out, read its steps, run them in order, and
//! stream their output — all reported as [`JobEvent`]s on a channel, ending with exactly
//! one [`JobEvent::Finished`] (the commit's verdict) or [`JobEvent::Infra`] (the job could
//! not be carried out, for a reason that is not the commit's: the runner hands it back).
//!
//! Each step runs as `sh -c` in a process group of its own. When the step's shell exits,
//! times out or the job is cancelled, the whole group is killed, so a step's forked
//! children and daemons do not outlive it (a process that leaves the group with `setsid`
//! escapes; that is documented in the README).

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tinyci_proto::{CommitId, RunReport, RunStatus, StepReport, StepStatus};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::git::{GitErrorKind, Workspace};
use crate::spec::{self, Step};

/// How long a step gets between SIGTERM and SIGKILL of its group.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long we keep reading a step's pipes after its group was killed (only processes that
/// escaped the group can still hold them).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A line longer than this is cut into pieces.
const MAX_LINE: usize = 16 * 1024;

/// What a job reports while it runs.
#[derive(Debug)]
pub enum JobEvent {
    /// More output (whole lines, prefixed `[step] `).
    Output(Vec<u8>),
    /// The checkout is done and the steps begin. Until then a stopping runner does not
    /// wait for the job: nothing of the commit's has run yet.
    StepsStarted,
    /// The job ended with a verdict on the commit; nothing follows.
    Finished(RunReport),
    /// The job could not be carried out for a reason that is not the commit's (fetch or
    /// checkout failed, the clone is beyond repair, the runner was stopped): the commit is
    /// to be handed back. Nothing follows.
    Infra(InfraFailure),
}

/// Why a job could not be carried out, when that is not the commit's fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfraFailure {
    /// In words, for the dispatcher's record of the attempt.
    pub reason: String,
    /// The origin could not be reached: the runner should pause until it can.
    pub origin_unreachable: bool,
}

/// Shared by the pipe readers of all steps: enforces the output cap and sends output on.
struct Output {
    events: UnboundedSender<JobEvent>,
    cap: u64,
    total: AtomicU64,
    truncated: AtomicBool,
}

impl Output {
    fn emit(&self, mut bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let len = bytes.len() as u64;
        let before = self.total.fetch_add(len, Ordering::Relaxed);
        if before >= self.cap {
            self.mark_truncated(Vec::new());
            return;
        }
        if before + len > self.cap {
            bytes.truncate((self.cap - before) as usize);
            self.mark_truncated(bytes);
            return;
        }
        let _ = self.events.send(JobEvent::Output(bytes));
    }

    fn mark_truncated(&self, mut head: Vec<u8>) {
        if !self.truncated.swap(true, Ordering::Relaxed) {
            head.extend_from_slice(
                format!(
                    "\n[tinyci] output truncated: more than {} bytes; the rest is discarded\n",
                    self.cap
                )
                .as_bytes(),
            );
            let _ = self.events.send(JobEvent::Output(head));
        }
    }

    fn note(&self, line: &str) {
        // Notes bypass the cap: they are few and say what happened.
        let _ = self
            .events
            .send(JobEvent::Output(format!("[tinyci] {line}\n").into_bytes()));
    }
}

/// Runs the job for `commit` in the runner's clone. Sends output and then exactly one
/// `Finished` or `Infra` on `events`. Cancelling `cancel` kills the running step's group.
pub async fn execute(
    workspace: Arc<tokio::sync::Mutex<Workspace>>,
    commit: CommitId,
    output_cap: u64,
    events: UnboundedSender<JobEvent>,
    cancel: CancellationToken,
) {
    let out = Arc::new(Output {
        events: events.clone(),
        cap: output_cap,
        total: AtomicU64::new(0),
        truncated: AtomicBool::new(false),
    });
    let end = match run_job(workspace, &commit, &out, &cancel).await {
        Ok(report) => JobEvent::Finished(report),
        Err(failure) => {
            out.note(&format!("not run here: {}", failure.reason));
            JobEvent::Infra(failure)
        }
    };
    let _ = events.send(end);
}

fn error_report(out: &Output, steps: Vec<StepReport>, message: String) -> RunReport {
    out.note(&format!("error: {message}"));
    RunReport {
        status: RunStatus::Error,
        steps,
        error: Some(message),
    }
}

/// The reason a job cancelled by its runner ends with.
pub const STOPPED: &str = "the runner was stopped";

/// The failure of a job that was stopped before it ended.
fn stopped() -> InfraFailure {
    InfraFailure {
        reason: STOPPED.into(),
        origin_unreachable: false,
    }
}

/// Makes the clone the commit and reads its steps: `Err` when that is not the commit's
/// fault, `Ok(Err(report))` when the commit itself has no usable spec.
async fn prepare(
    workspace: &Arc<tokio::sync::Mutex<Workspace>>,
    commit: &CommitId,
    out: &Output,
    cancel: &CancellationToken,
) -> Result<Result<(spec::Spec, std::path::PathBuf), RunReport>, InfraFailure> {
    let started = Instant::now();
    let mut ws = workspace.lock().await;
    let prepared = ws.prepare(commit, cancel).await.map_err(|e| {
        if e.kind == GitErrorKind::Cancelled {
            stopped()
        } else {
            InfraFailure {
                reason: format!("checkout failed: {e}"),
                origin_unreachable: e.origin_unreachable(),
            }
        }
    })?;
    for repair in &prepared.repairs {
        out.note(repair);
    }
    out.note(&format!(
        "checked out {} in {} ms{}",
        commit.short(),
        started.elapsed().as_millis(),
        if prepared.fetched { " (fetched)" } else { "" }
    ));
    let path = ws.path().to_path_buf();
    drop(ws);
    let (p, c) = (path.clone(), commit.clone());
    let source = tokio::task::spawn_blocking(move || {
        crate::git::read_root_file(&p, &c, spec::SPEC_FILE, spec::MAX_SPEC_BYTES, "tests")
    })
    .await
    .map_err(|e| InfraFailure {
        reason: format!("reading the spec: {e}"),
        origin_unreachable: false,
    })?
    .map_err(|e| InfraFailure {
        reason: format!("reading the spec: {e}"),
        origin_unreachable: false,
    })?;
    Ok(match spec::from_tree(source.0, source.1) {
        Ok(spec) => Ok((spec, path)),
        Err(e) => Err(error_report(out, Vec::new(), e.to_string())),
    })
}

async fn run_job(
    workspace: Arc<tokio::sync::Mutex<Workspace>>,
    commit: &CommitId,
    out: &Arc<Output>,
    cancel: &CancellationToken,
) -> Result<RunReport, InfraFailure> {
    let (spec, repo) = match prepare(&workspace, commit, out, cancel).await? {
        Ok(pair) => pair,
        Err(report) => return Ok(report),
    };
    let repo = repo.as_path();
    let _ = out.events.send(JobEvent::StepsStarted);
    let mut steps = Vec::with_capacity(spec.steps.len());
    let mut failed = false;
    for step in &spec.steps {
        if cancel.is_cancelled() {
            return Err(stopped());
        }
        if failed {
            steps.push(StepReport {
                name: step.name.clone(),
                status: StepStatus::Skipped,
                exit_code: None,
                duration_ms: 0,
            });
            continue;
        }
        let report = run_step(repo, commit, step, out, cancel).await;
        if cancel.is_cancelled() {
            return Err(stopped());
        }
        failed = report.status != StepStatus::Success;
        steps.push(report);
    }
    Ok(RunReport {
        status: if failed {
            RunStatus::Failure
        } else {
            RunStatus::Success
        },
        steps,
        error: None,
    })
}

enum End {
    Exited(std::process::ExitStatus),
    WaitFailed(std::io::Error),
    TimedOut,
    Cancelled,
}

async fn run_step(
    workdir: &std::path::Path,
    commit: &CommitId,
    step: &Step,
    out: &Arc<Output>,
    cancel: &CancellationToken,
) -> StepReport {
    let started = Instant::now();
    let report = |status, exit_code| StepReport {
        name: step.name.clone(),
        status,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&step.run)
        .current_dir(workdir)
        .env("CI", "true")
        .env("TINYCI_COMMIT", commit.as_str())
        .env("TINYCI_STEP", &step.name)
        .env(CLONE_ENV, workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe. If the runner dies (even by SIGKILL), the step's shell is
    // killed with it; what the shell forked is swept by the next runner on this clone
    // (`kill_leftovers`).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            out.note(&format!("step {}: cannot start sh: {e}", step.name));
            return report(StepStatus::Failure, None);
        }
    };
    let pgid = child.id().map(|p| p as libc::pid_t);
    let prefix = format!("[{}] ", step.name).into_bytes();
    let mut readers = Vec::new();
    if let Some(r) = child.stdout.take() {
        readers.push(tokio::spawn(pump(r, prefix.clone(), out.clone())));
    }
    if let Some(r) = child.stderr.take() {
        readers.push(tokio::spawn(pump(r, prefix, out.clone())));
    }

    let end = tokio::select! {
        res = child.wait() => match res {
            Ok(st) => End::Exited(st),
            Err(e) => End::WaitFailed(e),
        },
        _ = tokio::time::sleep(step.timeout) => End::TimedOut,
        _ = cancel.cancelled() => End::Cancelled,
    };
    if matches!(end, End::TimedOut | End::Cancelled) {
        kill_group(pgid, libc::SIGTERM);
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            out.note(&format!(
                "step {} ignored SIGTERM for {KILL_GRACE:?}; killing",
                step.name
            ));
        }
    }
    // Whatever the step left running in its group (daemons, background jobs) ends with it.
    kill_group(pgid, libc::SIGKILL);
    let _ = child.wait().await;

    let drain = async {
        for r in readers.iter_mut() {
            let _ = r.await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        for r in &readers {
            r.abort();
        }
        out.note(&format!(
            "step {}: a process that left the step's process group still holds its output; not waiting for it",
            step.name
        ));
    }

    match end {
        End::Exited(st) => {
            let code = st.code();
            if code == Some(0) {
                report(StepStatus::Success, code)
            } else {
                if code.is_none() {
                    out.note(&format!("step {} was killed by a signal", step.name));
                }
                report(StepStatus::Failure, code)
            }
        }
        End::WaitFailed(e) => {
            out.note(&format!("step {}: waiting for it failed: {e}", step.name));
            report(StepStatus::Failure, None)
        }
        End::TimedOut => {
            out.note(&format!(
                "step {} timed out after {:?}; its process group was killed",
                step.name, step.timeout
            ));
            report(StepStatus::Timeout, None)
        }
        End::Cancelled => report(StepStatus::Failure, None),
    }
}

/// The environment variable that marks every process of a step with the runner's clone.
pub const CLONE_ENV: &str = "TINYCI_RUNNER_CLONE";

/// Kills the processes that a previous runner on the clone at `workdir` left behind (it was
/// killed mid-step, say): every process of this user whose environment carries
/// `TINYCI_RUNNER_CLONE=<workdir>`. Returns how many were killed. Only one runner may use a
/// clone at a time, so these cannot belong to a live runner.
pub fn kill_leftovers(workdir: &std::path::Path) -> usize {
    let mut needle = format!("{CLONE_ENV}=").into_bytes();
    needle.extend_from_slice(workdir.as_os_str().as_encoded_bytes());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let me = std::process::id();
    let mut killed = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        // Unreadable (another user's process, or gone): not ours to kill.
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_slice()) {
            // SAFETY: kill(2) on a process that carries our clone's marker.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

/// Signals every process in group `pgid` (ignoring a group that is already gone).
fn kill_group(pgid: Option<libc::pid_t>, sig: libc::c_int) {
    if let Some(pgid) = pgid.filter(|p| *p > 1) {
        // SAFETY: kill(2) with a negative pid signals the process group; no memory involved.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// Reads one pipe, cuts it into lines, prefixes each, and emits whole lines as they come.
async fn pump(mut r: impl AsyncRead + Unpin, prefix: Vec<u8>, out: Arc<Output>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut batch = Vec::with_capacity(n + 64);
        for piece in buf[..n].split_inclusive(|b| *b == b'\n') {
            partial.extend_from_slice(piece);
            if partial.last() == Some(&b'\n') || partial.len() >= MAX_LINE {
                batch.extend_from_slice(&prefix);
                batch.extend_from_slice(&partial);
                if batch.last() != Some(&b'\n') {
                    batch.push(b'\n');
                }
                partial.clear();
            }
        }
        out.emit(batch);
    }
    if !partial.is_empty() {
        let mut line = prefix;
        line.extend_from_slice(&partial);
        line.push(b'\n');
        out.emit(line);
    }
}
