//! One job on a runner: check the commit out, read its steps, run them in order, and
//! stream their output — all reported as [`JobEvent`]s on a channel, ending with exactly
//! one [`JobEvent::Finished`] (the commit's verdict) or [`JobEvent::Infra`] (the job could
//! not be carried out, for a reason that is not the commit's: the runner hands it back).
//!
//! Each step runs as `sh -e -c RUN` under a per-step supervisor ([`super::supervisor`]),
//! in a process group of its own. When the step's shell exits, times out or the job is
//! cancelled — or the runner dies, even by `kill -9` — the supervisor kills every process
//! the step started (its group, and every descendant, `setsid` or not), so nothing of a
//! step outlives it.
//!
//! A step sees the runner's environment without tinyci's own settings (`TINYCI_*`: the token
//! above all) and without the variables that point git at another repository (`GIT_DIR`…),
//! plus `CI`, `TINYCI_COMMIT`, `TINYCI_STEP` and [`CLONE_ENV`] ([`step_environment`]).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tinyci_proto::{CommitId, GiveBackCause, RunReport, RunStatus, StepReport, StepStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::supervisor;
use crate::git::{GitErrorKind, Workspace};
use crate::spec::{self, Step};

/// How long a step gets between SIGTERM and SIGKILL of its group.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long we keep reading a step's pipes after its group was killed (only processes that
/// escaped the group can still hold them).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A line longer than this is cut into pieces.
pub const MAX_LINE: usize = 16 * 1024;

/// How long a step's supervisor may take to exit once told to kill everything.
const SUPERVISOR_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The runner's own binary, which becomes a step's supervisor (works even if the file was
/// replaced or deleted since the runner started).
const SELF_EXE: &str = "/proc/self/exe";

/// What a step's supervisor is called in `ps`.
const SUPERVISOR_NAME: &str = "tinyci-step-supervisor";

/// The variables git uses to find a repository other than the one in the current
/// directory (`git rev-parse --local-env-vars`, the list git itself clears when it enters a
/// submodule). A step gets none of them, so `git` in a step works on the checkout.
const GIT_LOCAL_ENV: &[&str] = &[
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_IMPLICIT_WORK_TREE",
    "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE",
    "GIT_NO_REPLACE_OBJECTS",
    "GIT_REPLACE_REF_BASE",
    "GIT_PREFIX",
    "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
];

/// The environment of a step: `inherited` (the runner's) without any `TINYCI_*` variable
/// (tinyci's own settings, the token above all) and without [`GIT_LOCAL_ENV`], plus
/// `CI=true`, `TINYCI_COMMIT`, `TINYCI_STEP` and [`CLONE_ENV`].
pub fn step_environment(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    commit: &CommitId,
    step: &str,
    clone: &Path,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = inherited
        .into_iter()
        .filter(|(k, _)| {
            let key = k.as_encoded_bytes();
            !key.starts_with(b"TINYCI_")
                && key != b"CI"
                && !GIT_LOCAL_ENV.iter().any(|g| g.as_bytes() == key)
        })
        .collect();
    env.push(("CI".into(), "true".into()));
    env.push(("TINYCI_COMMIT".into(), commit.as_str().into()));
    env.push(("TINYCI_STEP".into(), step.into()));
    env.push((CLONE_ENV.into(), clone.as_os_str().to_owned()));
    env
}

/// Sends one control byte to a step's supervisor (a supervisor already gone needs none).
async fn send_control(control: &mut Option<ChildStdin>, byte: u8) {
    if let Some(pipe) = control.as_mut() {
        let _ = pipe.write_all(&[byte]).await;
        let _ = pipe.flush().await;
    }
}

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
    /// What kind of trouble: [`GiveBackCause::OriginUnreachable`] has the runner pause
    /// until origin answers; [`GiveBackCause::NotInOrigin`] has the dispatcher wait for
    /// the commit to be pushed. (A runner that is stopping says `Withdrawn` instead.)
    pub cause: GiveBackCause,
    /// The steps that ended before the job was stopped (the stopped one included).
    pub steps: Vec<StepReport>,
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
///
/// `cancelled_by_client` tells a cancel by a client (the run ends as `cancelled`, with the
/// steps that ran) from the runner stopping (the job is handed back).
pub async fn execute(
    workspace: Arc<tokio::sync::Mutex<Workspace>>,
    commit: CommitId,
    output_cap: u64,
    events: UnboundedSender<JobEvent>,
    cancel: CancellationToken,
    cancelled_by_client: Arc<AtomicBool>,
) {
    let out = Arc::new(Output {
        events: events.clone(),
        cap: output_cap,
        total: AtomicU64::new(0),
        truncated: AtomicBool::new(false),
    });
    let end = match run_job(workspace, &commit, &out, &cancel).await {
        Ok(report) => JobEvent::Finished(report),
        Err(failure) if cancelled_by_client.load(Ordering::SeqCst) => {
            out.note("cancelled by a client; the steps were stopped");
            JobEvent::Finished(RunReport {
                status: RunStatus::Cancelled,
                steps: failure.steps,
                error: Some("cancelled".into()),
            })
        }
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
    stopped_after(Vec::new())
}

/// The failure of a job stopped after `steps` ended.
fn stopped_after(steps: Vec<StepReport>) -> InfraFailure {
    InfraFailure {
        reason: STOPPED.into(),
        cause: GiveBackCause::Infrastructure,
        steps,
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
                cause: if e.origin_unreachable() {
                    GiveBackCause::OriginUnreachable
                } else if e.kind == GitErrorKind::NotFound {
                    GiveBackCause::NotInOrigin
                } else {
                    GiveBackCause::Infrastructure
                },
                steps: Vec::new(),
            }
        }
    })?;
    for repair in &prepared.repairs {
        out.note(repair);
    }
    let phases: Vec<String> = prepared
        .phases
        .iter()
        .map(|(name, took)| format!("{name} {:.1}", took.as_secs_f64() * 1000.0))
        .collect();
    out.note(&format!(
        "checked out {} in {} ms{} ({})",
        commit.short(),
        started.elapsed().as_millis(),
        if prepared.fetched { ", fetched" } else { "" },
        phases.join(", ")
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
        cause: GiveBackCause::Infrastructure,
        steps: Vec::new(),
    })?
    .map_err(|e| InfraFailure {
        reason: format!("reading the spec: {e}"),
        cause: GiveBackCause::Infrastructure,
        steps: Vec::new(),
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
            return Err(stopped_after(steps));
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
            steps.push(report);
            return Err(stopped_after(steps));
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
    workdir: &Path,
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
    // The step runs under a supervisor (see `supervisor`): the runner's own binary in a
    // hidden mode, which kills every process of the step when the step ends, when told to,
    // or when this runner dies.
    let mut cmd = tokio::process::Command::new(SELF_EXE);
    cmd.arg0(SUPERVISOR_NAME)
        .arg(supervisor::ARG)
        .args(["sh", "-e", "-c"])
        .arg(&step.run)
        .current_dir(workdir)
        .env_clear()
        .envs(step_environment(
            std::env::vars_os(),
            commit,
            &step.name,
            workdir,
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Away from the runner's group, so a Ctrl-C meant for the runner does not reach
        // the step behind its back; the runner stops steps through the control pipe.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            out.note(&format!(
                "step {}: cannot start its supervisor: {e}",
                step.name
            ));
            return report(StepStatus::Failure, None);
        }
    };
    // The control pipe: closing it (also by our death) kills everything of the step.
    let mut control = child.stdin.take();
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
    let mut asked_to_kill = false;
    if matches!(end, End::TimedOut | End::Cancelled) {
        send_control(&mut control, supervisor::TERMINATE).await;
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            out.note(&format!(
                "step {} ignored SIGTERM for {KILL_GRACE:?}; killing",
                step.name
            ));
        }
        asked_to_kill = true;
    }
    // Whatever the step left running (daemons, background jobs) ends with it: closing the
    // control pipe tells the supervisor to kill everything that is left and exit.
    drop(control);
    let exit = match tokio::time::timeout(SUPERVISOR_EXIT_TIMEOUT, child.wait()).await {
        Ok(res) => res.ok(),
        Err(_) => {
            out.note(&format!(
                "step {}: its supervisor did not exit; killing it",
                step.name
            ));
            let _ = child.kill().await;
            None
        }
    };
    // A supervisor that died by a signal nobody sent it (a step can `kill -9 $PPID`) left
    // the step's orphans to init: sweep them by their clone marker.
    if exit.map_or(true, |st| st.signal().is_some()) && !asked_to_kill {
        let dir = workdir.to_path_buf();
        let swept = tokio::task::spawn_blocking(move || kill_leftovers(&dir))
            .await
            .unwrap_or(0);
        if swept > 0 {
            out.note(&format!(
                "step {}: killed {swept} processes it left behind",
                step.name
            ));
        }
    }

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
                "step {} timed out after {:?}; its processes were killed",
                step.name, step.timeout
            ));
            report(StepStatus::Timeout, None)
        }
        End::Cancelled => report(StepStatus::Failure, None),
    }
}

/// The environment variable that marks every process of a step with the runner's clone.
pub const CLONE_ENV: &str = "TINYCI_RUNNER_CLONE";

/// Kills every process of this user whose environment carries
/// `TINYCI_RUNNER_CLONE=<workdir>`: what a step left behind after its supervisor was killed
/// from outside (by the step itself, or the OOM killer), which is the one way a step's
/// process can escape. Used right after such a step, and at start for whatever an earlier
/// runner on the clone left. Returns how many were killed. Only one runner may use a clone
/// at a time, and it runs one step at a time, so these belong to no running step.
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
        for mut piece in buf[..n].split_inclusive(|b| *b == b'\n') {
            // A line longer than MAX_LINE becomes pieces of exactly MAX_LINE bytes.
            while !piece.is_empty() {
                let take = piece.len().min(MAX_LINE - partial.len());
                partial.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if partial.last() == Some(&b'\n') || partial.len() >= MAX_LINE {
                    batch.extend_from_slice(&prefix);
                    batch.extend_from_slice(&partial);
                    if batch.last() != Some(&b'\n') {
                        batch.push(b'\n');
                    }
                    partial.clear();
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_get_no_tinyci_setting_and_no_git_redirection() {
        let inherited = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/ci"),
            ("TINYCI_TOKEN", "s3cret"),
            ("TINYCI_ANYTHING", "x"),
            ("CI", "false"),
            ("GIT_DIR", "/elsewhere/.git"),
            ("GIT_WORK_TREE", "/elsewhere"),
            ("GIT_INDEX_FILE", "/elsewhere/.git/index"),
            ("GIT_SSH_COMMAND", "ssh -i key"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let commit = CommitId::parse(&"a".repeat(40)).unwrap();
        let env = step_environment(inherited, &commit, "test", Path::new("/clone"));
        let get = |k: &str| {
            let all: Vec<_> = env.iter().filter(|(key, _)| key == k).collect();
            assert!(all.len() <= 1, "{k} twice: {env:?}");
            all.first().map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("PATH").as_deref(), Some("/usr/bin"));
        assert_eq!(get("GIT_SSH_COMMAND").as_deref(), Some("ssh -i key"));
        assert_eq!(get("CI").as_deref(), Some("true"));
        assert_eq!(get("TINYCI_COMMIT"), Some("a".repeat(40)));
        assert_eq!(get("TINYCI_STEP").as_deref(), Some("test"));
        assert_eq!(get(CLONE_ENV).as_deref(), Some("/clone"));
        for gone in [
            "TINYCI_TOKEN",
            "TINYCI_ANYTHING",
            "GIT_DIR",
            "GIT_WORK_TREE",
            "GIT_INDEX_FILE",
        ] {
            assert_eq!(get(gone), None, "{gone} leaked");
        }
    }

    #[tokio::test]
    async fn long_lines_are_cut_into_prefixed_pieces() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let out = Arc::new(Output {
            events: tx,
            cap: u64::MAX,
            total: AtomicU64::new(0),
            truncated: AtomicBool::new(false),
        });
        let mut input = vec![b'x'; MAX_LINE * 2 + 10];
        input.extend_from_slice(b"\nshort\n");
        pump(&input[..], b"[s] ".to_vec(), out).await;
        let mut text = Vec::new();
        while let Ok(JobEvent::Output(bytes)) = rx.try_recv() {
            text.extend(bytes);
        }
        let lines: Vec<&[u8]> = text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 4, "three pieces and the short line");
        for piece in &lines[..3] {
            assert!(piece.starts_with(b"[s] x"));
        }
        assert_eq!(lines[0].len(), 4 + MAX_LINE);
        assert_eq!(lines[2].len(), 4 + 10);
        assert_eq!(lines[3], b"[s] short");
    }
}
