//! The `tinyci` command: a table for people, `--json` for scripts, and exit codes a script
//! can rely on.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (`show`/`wait`: the run succeeded) |
//! | 1 | the run failed |
//! | 2 | the run ended in `error` |
//! | 3 | the run was cancelled |
//! | 4 | not finished: `wait --timeout` ran out, or `show` of a queued or running run |
//! | 5 | unknown commit (or an ambiguous prefix) |
//! | 64 | usage: bad command line |
//! | 69 | the dispatcher is unreachable |
//! | 70 | the dispatcher answered something unexpected, or refused the request |
//! | 75 | `submit`/`cancel` took effect but the dispatcher's database could not record it yet (it is recorded once the database works again; sending it again is safe) |
//! | 78 | configuration: wrong token, another protocol version, not a tinyci dispatcher |
//! | 130 | `logs -f` or `wait` interrupted with Ctrl-C (the run goes on) |

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use serde_json::json;
use tinyci_proto::{
    CommitId, DispatcherStatus, RunDetail, RunQuery, RunState, RunSummary, RunnerState, RunnerView,
    StepReport, StepStatus,
};

use super::{follow_log, hook, Client, ClientError, FollowEvent};
use crate::net;

/// How long `wait --timeout` lets the dispatcher take to answer its first question, however
/// short the timeout.
const FIRST_LOOK: Duration = Duration::from_secs(1);

/// Exit codes of `tinyci` (see the module documentation).
pub mod code {
    /// The run succeeded, or the command did what it was asked.
    pub const OK: u8 = 0;
    /// The run failed.
    pub const FAILURE: u8 = 1;
    /// The run ended in `error`.
    pub const ERROR: u8 = 2;
    /// The run was cancelled.
    pub const CANCELLED: u8 = 3;
    /// Not finished (wait timed out; show of an unfinished run).
    pub const NOT_FINISHED: u8 = 4;
    /// Unknown commit or ambiguous prefix.
    pub const UNKNOWN: u8 = 5;
    /// Bad command line (`EX_USAGE`).
    pub const USAGE: u8 = 64;
    /// The dispatcher is unreachable (`EX_UNAVAILABLE`).
    pub const UNREACHABLE: u8 = 69;
    /// An unexpected answer or a refusal (`EX_SOFTWARE`).
    pub const SOFTWARE: u8 = 70;
    /// Took effect but not recorded yet (`EX_TEMPFAIL`).
    pub const NOT_RECORDED: u8 = 75;
    /// Wrong configuration (`EX_CONFIG`).
    pub const CONFIG: u8 = 78;
    /// Interrupted by Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

/// Talks to a tinyci dispatcher: what it is doing, the runs, their logs; submit and cancel.
#[derive(Parser, Debug)]
#[command(name = "tinyci", version)]
pub struct Args {
    /// The dispatcher's host:port.
    #[arg(
        long,
        global = true,
        env = "TINYCI_DISPATCHER",
        default_value = "localhost:8888",
        value_parser = net::parse_peer_addr
    )]
    pub dispatcher_server: String,
    /// File holding the shared secret (default: $TINYCI_TOKEN, if set).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The queue (and why each commit waits), the runners and the counts.
    Status,
    /// The runs, newest first.
    Runs {
        /// Only runs in this state (queued, running, success, failure, error, cancelled).
        #[arg(long)]
        status: Option<RunState>,
        /// Only runs of this branch.
        #[arg(long)]
        branch: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One run: its steps, attempts and result. Exit code by its status.
    Show {
        /// A commit id, a unique prefix of one, or a ref name in the current repository.
        commit: String,
    },
    /// A run's log; with -f, follow it until the run ends.
    Logs {
        /// A commit id, a unique prefix of one, or a ref name in the current repository.
        commit: String,
        /// Keep printing output as it arrives, until the run ends (survives a dispatcher
        /// restart).
        #[arg(short, long)]
        follow: bool,
    },
    /// Waits for a run to end. Exit code by its status (4 when --timeout runs out).
    Wait {
        /// A commit id, a unique prefix of one, or a ref name in the current repository.
        commit: String,
        /// Give up after this long (e.g. 90s, 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Queues commits (oldest first).
    Submit {
        /// Commit ids or ref names in the current repository.
        #[arg(required = true)]
        commits: Vec<String>,
        /// The branch to record them under.
        #[arg(long)]
        branch: Option<String>,
        /// Put them at the front of the queue.
        #[arg(long)]
        front: bool,
        /// Run finished ones again.
        #[arg(long)]
        rerun: bool,
    },
    /// Cancels a queued or running commit (its steps are killed; its result says cancelled).
    Cancel {
        /// A commit id, a unique prefix of one, or a ref name in the current repository.
        commit: String,
    },
    /// The runners and what each is doing.
    Runners,
    /// Why a commit is not running (or what it is doing).
    Why {
        /// A commit id, a unique prefix of one, or a ref name in the current repository.
        commit: String,
    },
    /// Git hooks that submit pushed commits and stream their runs into `git push`.
    Hook {
        /// Which.
        #[command(subcommand)]
        action: hook::HookCommand,
    },
}

/// Parses the command line and runs it; the whole of `tinyci`'s `main`.
pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                code::USAGE
            } else {
                code::OK
            });
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(code::SOFTWARE);
        }
    };
    ExitCode::from(rt.block_on(run(args)))
}

/// How `tinyci` writes: colour only on a terminal and never with `NO_COLOR`.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// Whether to use ANSI colours.
    pub color: bool,
}

impl Style {
    /// Colour when stdout is a terminal and `NO_COLOR` is unset or empty.
    pub fn detect() -> Style {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            color: !no_color && std::io::stdout().is_terminal(),
        }
    }

    /// `text` in the colour of `state`.
    pub fn state(&self, state: RunState) -> String {
        let c = match state {
            RunState::Success => "32",
            RunState::Failure | RunState::Error => "31",
            RunState::Queued | RunState::Running => "33",
            RunState::Cancelled => "90",
        };
        self.paint(c, state.as_str())
    }

    /// `text` in ANSI colour `c` (an SGR code), or plain.
    pub fn paint(&self, c: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{c}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The exit code for a run in `state`.
pub fn state_code(state: RunState) -> u8 {
    match state {
        RunState::Success => code::OK,
        RunState::Failure => code::FAILURE,
        RunState::Error => code::ERROR,
        RunState::Cancelled => code::CANCELLED,
        RunState::Queued | RunState::Running => code::NOT_FINISHED,
    }
}

/// The exit code for an error, after printing it.
fn fail(e: &ClientError) -> u8 {
    eprintln!("error: {}", crate::exit::cause_chain(e));
    if e.is_unreachable() {
        eprintln!("hint: is the dispatcher running there? Name it with --dispatcher-server HOST:PORT or TINYCI_DISPATCHER");
    }
    match e {
        ClientError::NotFound(_) | ClientError::Ambiguous { .. } => code::UNKNOWN,
        ClientError::NotRecorded(_) => code::NOT_RECORDED,
        e if e.is_unreachable() => code::UNREACHABLE,
        e if crate::exit::is_permanent(e) => code::CONFIG,
        _ => code::SOFTWARE,
    }
}

/// The connection settings every command shares.
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// The shared secret.
    pub token: Option<String>,
    /// Where it came from, if from a file (the hooks name the same file).
    pub token_file: Option<PathBuf>,
}

impl Target {
    async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.addr, self.token.as_deref()).await
    }
}

/// Runs one parsed command line; returns the exit code.
pub async fn run(args: Args) -> u8 {
    let token = match net::load_token(args.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return code::CONFIG;
        }
    };
    let target = Target {
        addr: args.dispatcher_server.clone(),
        token,
        token_file: args
            .token_file
            .as_ref()
            .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone())),
    };
    let style = Style::detect();
    let json = args.json;
    let res = match args.command {
        Command::Status => status(&target, json, style).await,
        Command::Runners => runners(&target, json).await,
        Command::Runs {
            status,
            branch,
            limit,
        } => {
            let q = RunQuery {
                state: status,
                branch,
                limit,
                offset: 0,
            };
            runs(&target, q, json, style).await
        }
        Command::Show { commit } => show(&target, &commit, json, style).await,
        Command::Logs { commit, follow } => logs(&target, &commit, follow).await,
        Command::Wait { commit, timeout } => wait(&target, &commit, timeout, json, style).await,
        Command::Submit {
            commits,
            branch,
            front,
            rerun,
        } => submit(&target, &commits, branch, front, rerun, json).await,
        Command::Cancel { commit } => cancel(&target, &commit, json).await,
        Command::Why { commit } => why(&target, &commit, json).await,
        Command::Hook { action } => return hook::run(action, &target).await,
    };
    match res {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// What a command-line commit names, before asking the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// A full id.
    Id(CommitId),
    /// Hex digits the dispatcher should complete.
    Prefix(String),
}

/// Reads a command-line commit: a full id; else a name the current repository resolves
/// (a ref, `HEAD~1`, an abbreviated id it knows); else hex digits (4 or more) for the
/// dispatcher to complete.
pub fn name_commit(arg: &str) -> Result<Named, ClientError> {
    if let Ok(id) = CommitId::parse(arg) {
        return Ok(Named::Id(id));
    }
    if let Some(id) = crate::git::resolve_here(arg) {
        return Ok(Named::Id(id));
    }
    let hex = arg.len() >= 4
        && arg.len() <= 64
        && arg
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex {
        Ok(Named::Prefix(arg.to_owned()))
    } else {
        Err(ClientError::NotFound(format!(
            "{arg:?} is neither a commit id (4 to 64 lowercase hex digits) nor a name the repository here resolves"
        )))
    }
}

/// The full id for `arg`, asking the dispatcher to complete a prefix.
async fn full_id(client: &mut Client, arg: &str) -> Result<CommitId, ClientError> {
    match name_commit(arg)? {
        Named::Id(id) => Ok(id),
        Named::Prefix(p) => Ok(client.run(&p).await?.summary.commit),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `1.2s`, `3m04s`, `812ms`.
pub fn human_duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// `5s ago`, `3m ago`…
pub fn ago(at_ms: u64) -> String {
    let d = now_ms().saturating_sub(at_ms) / 1000;
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

fn rfc3339_ms(ms: u64) -> String {
    crate::results::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

fn summary_json(r: &RunSummary) -> serde_json::Value {
    json!({
        "id": r.commit.as_str(),
        "status": r.state.as_str(),
        "branch": r.branch,
        "failed_steps": r.failed_steps,
        "queued_at": rfc3339_ms(r.queued_at_ms),
        "finished_at": r.finished_at_ms.map(rfc3339_ms),
        "attempts": r.attempts,
    })
}

fn step_word(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Success => "success",
        StepStatus::Failure => "failure",
        StepStatus::Timeout => "timeout",
        StepStatus::Skipped => "skipped",
    }
}

fn steps_json(steps: &[StepReport]) -> serde_json::Value {
    steps
        .iter()
        .map(|s| {
            json!({"name": s.name, "status": step_word(s.status), "exit_code": s.exit_code, "duration_ms": s.duration_ms})
        })
        .collect()
}

/// The JSON `show --json` prints for a run.
pub fn detail_json(d: &RunDetail) -> serde_json::Value {
    let mut v = summary_json(&d.summary);
    v["steps"] = steps_json(&d.steps);
    v["runner"] = json!(d.runner);
    v["started_at"] = json!(d.started_at_ms.map(rfc3339_ms));
    v["error"] = json!(d.error);
    v["log_bytes"] = json!(d.log_len);
    v["result_file"] = json!(d.result_file);
    v["attempt_history"] = d
        .attempts
        .iter()
        .map(|a| {
            json!({"job": a.job.to_string(), "runner": a.runner, "started_at": rfc3339_ms(a.started_at_ms),
                   "ended_at": a.ended_at_ms.map(rfc3339_ms), "outcome": a.outcome, "reason": a.reason})
        })
        .collect();
    v
}

fn runner_line(r: &RunnerView) -> String {
    match &r.state {
        RunnerState::Idle => format!("{:<22} idle", r.addr),
        RunnerState::Busy { commit, .. } => format!("{:<22} running {}", r.addr, commit.short()),
        RunnerState::Paused { reason } => format!("{:<22} paused: {reason}", r.addr),
    }
}

fn runner_json(r: &RunnerView) -> serde_json::Value {
    let (state, commit, reason) = match &r.state {
        RunnerState::Idle => ("idle", None, None),
        RunnerState::Busy { commit, .. } => ("busy", Some(commit.as_str()), None),
        RunnerState::Paused { reason } => ("paused", None, Some(reason.as_str())),
    };
    json!({"id": r.id.0, "addr": r.addr, "state": state, "commit": commit, "reason": reason})
}

fn status_json(s: &DispatcherStatus) -> serde_json::Value {
    let counts: serde_json::Map<String, serde_json::Value> = s
        .counts
        .iter()
        .map(|(k, n)| (k.as_str().to_owned(), json!(n)))
        .collect();
    json!({
        "queue": s.queue.iter().map(|q| json!({
            "id": q.commit.as_str(), "branch": q.branch, "queued_at": rfc3339_ms(q.queued_at_ms),
            "attempts": q.attempts, "waiting": q.waiting,
        })).collect::<Vec<_>>(),
        "running": s.running.iter().map(summary_json).collect::<Vec<_>>(),
        "runners": s.runners.iter().map(runner_json).collect::<Vec<_>>(),
        "counts": counts,
        "refusing": s.refusing,
    })
}

async fn status(t: &Target, json: bool, style: Style) -> Result<u8, ClientError> {
    let s = t.connect().await?.status().await?;
    if json {
        print_json(&status_json(&s));
        return Ok(code::OK);
    }
    let mut out = String::new();
    if let Some(why) = &s.refusing {
        out.push_str(&format!("refusing submissions: {why}\n"));
    }
    out.push_str(&format!("queue: {}\n", s.queue.len()));
    for q in &s.queue {
        out.push_str(&format!(
            "  {}  {:<12} queued {:<8} attempts {}  waiting: {}\n",
            q.commit.short(),
            q.branch.as_deref().unwrap_or("-"),
            ago(q.queued_at_ms),
            q.attempts,
            q.waiting
        ));
    }
    out.push_str(&format!("running: {}\n", s.running.len()));
    for r in &s.running {
        out.push_str(&format!(
            "  {}  {:<12} queued {}\n",
            r.commit.short(),
            r.branch.as_deref().unwrap_or("-"),
            ago(r.queued_at_ms)
        ));
    }
    out.push_str(&format!("runners: {}\n", s.runners.len()));
    for r in &s.runners {
        out.push_str(&format!("  {}\n", runner_line(r)));
    }
    let counts: Vec<String> = s
        .counts
        .iter()
        .map(|(k, n)| format!("{} {n}", style.state(*k)))
        .collect();
    out.push_str(&format!("runs: {}\n", counts.join(", ")));
    print!("{out}");
    Ok(code::OK)
}

async fn runners(t: &Target, json: bool) -> Result<u8, ClientError> {
    let s = t.connect().await?.status().await?;
    if json {
        print_json(&json!(s
            .runners
            .iter()
            .map(runner_json)
            .collect::<Vec<_>>()));
    } else if s.runners.is_empty() {
        println!("no runner is registered");
    } else {
        for r in &s.runners {
            println!("{}", runner_line(r));
        }
    }
    Ok(code::OK)
}

async fn runs(t: &Target, q: RunQuery, json: bool, style: Style) -> Result<u8, ClientError> {
    let (total, runs) = t.connect().await?.runs(q).await?;
    if json {
        print_json(
            &json!({"total": total, "data": runs.iter().map(summary_json).collect::<Vec<_>>()}),
        );
        return Ok(code::OK);
    }
    if runs.is_empty() {
        println!("no runs");
        return Ok(code::OK);
    }
    println!(
        "{:<12} {:<9} {:<14} {:<10} {:>8}  failed steps",
        "commit", "status", "branch", "queued", "attempts"
    );
    for r in &runs {
        // Pad before painting: escape codes have no width.
        let state = format!("{:<9}", r.state.as_str());
        let state = state.replace(r.state.as_str(), &style.state(r.state));
        println!(
            "{:<12} {} {:<14} {:<10} {:>8}  {}",
            r.commit.short(),
            state,
            r.branch.as_deref().unwrap_or("-"),
            ago(r.queued_at_ms),
            r.attempts,
            r.failed_steps.join(", ")
        );
    }
    if total > runs.len() as u64 {
        println!("({} of {total}; --limit shows more)", runs.len());
    }
    Ok(code::OK)
}

/// A run's steps and verdict, as `show` and the push hook print them.
pub fn render_detail(d: &RunDetail, style: Style) -> String {
    let s = &d.summary;
    let mut out = format!("commit   {}\nstatus   {}\n", s.commit, style.state(s.state));
    if let Some(b) = &s.branch {
        out.push_str(&format!("branch   {b}\n"));
    }
    out.push_str(&format!(
        "queued   {} ({})\n",
        rfc3339_ms(s.queued_at_ms),
        ago(s.queued_at_ms)
    ));
    if let Some(f) = s.finished_at_ms {
        out.push_str(&format!("finished {}\n", rfc3339_ms(f)));
    }
    if let Some(r) = &d.runner {
        out.push_str(&format!("runner   {r}\n"));
    }
    out.push_str(&format!("attempts {}\n", s.attempts));
    if !d.steps.is_empty() {
        out.push_str("steps\n");
        for st in &d.steps {
            let word = step_word(st.status);
            let painted = match st.status {
                StepStatus::Success => style.paint("32", word),
                StepStatus::Failure | StepStatus::Timeout => style.paint("31", word),
                StepStatus::Skipped => style.paint("90", word),
            };
            let exit = st
                .exit_code
                .map(|c| format!(" (exit {c})"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {:<20} {painted}{exit} {}\n",
                st.name,
                human_duration(st.duration_ms)
            ));
        }
    }
    if let Some(e) = &d.error {
        out.push_str(&format!("error    {e}\n"));
    }
    if d.attempts.len() > 1 || d.attempts.iter().any(|a| a.reason.is_some()) {
        out.push_str("attempt history\n");
        for a in &d.attempts {
            out.push_str(&format!(
                "  {} on {}: {}{}\n",
                rfc3339_ms(a.started_at_ms),
                a.runner,
                a.outcome,
                a.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
    }
    out.push_str(&format!("result   {}\n", d.result_file));
    out
}

async fn show(t: &Target, arg: &str, json: bool, style: Style) -> Result<u8, ClientError> {
    let mut c = t.connect().await?;
    let d = match name_commit(arg)? {
        Named::Id(id) => c.run(id.as_str()).await?,
        Named::Prefix(p) => c.run(&p).await?,
    };
    if json {
        print_json(&detail_json(&d));
    } else {
        print!("{}", render_detail(&d, style));
    }
    Ok(state_code(d.summary.state))
}

/// Writes log bytes to stdout as they come.
fn write_out(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

async fn logs(t: &Target, arg: &str, follow: bool) -> Result<u8, ClientError> {
    let mut c = t.connect().await?;
    let id = full_id(&mut c, arg).await?;
    if !follow {
        c.start_log(id, 0, false).await?;
        loop {
            match c.next_log().await? {
                super::LogPiece::Data { data, .. } => write_out(&data),
                super::LogPiece::End { .. } => return Ok(code::OK),
            }
        }
    }
    drop(c);
    let followed = follow_log(&t.addr, t.token.as_deref(), &id, 0, None, |ev| match ev {
        FollowEvent::Data(d) => write_out(d),
        FollowEvent::Reconnecting(e, delay) => {
            eprintln!("tinyci: lost the dispatcher ({e}); reconnecting in {delay:?}")
        }
        FollowEvent::Reconnected => eprintln!("tinyci: reconnected; resuming the log"),
    });
    tokio::select! {
        r = followed => {
            r?;
            Ok(code::OK)
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ntinyci: detached; the run goes on. Cancel it with: tinyci cancel {id}");
            Ok(code::INTERRUPTED)
        }
    }
}

async fn wait(
    t: &Target,
    arg: &str,
    timeout: Option<Duration>,
    json: bool,
    style: Style,
) -> Result<u8, ClientError> {
    // A timeout too large to add to the clock is no timeout.
    let timeout = timeout.filter(|d| tokio::time::Instant::now().checked_add(*d).is_some());
    let deadline = timeout.map(|d| tokio::time::Instant::now() + d);
    let first_look = async {
        let mut c = t.connect().await?;
        let id = full_id(&mut c, arg).await?;
        let d = c.run(id.as_str()).await?;
        Ok::<_, ClientError>((id, d))
    };
    // --timeout bounds the whole wait, a dispatcher that does not answer included; the
    // first answer gets at least FIRST_LOOK, so that `--timeout 0s` still tells a
    // finished run.
    let (id, d) = match timeout {
        Some(limit) => {
            let limit = limit.max(FIRST_LOOK);
            tokio::time::timeout(limit, first_look)
                .await
                .map_err(|_| {
                    ClientError::Proto(tinyci_proto::ProtoError::Timeout(
                        limit,
                        "the dispatcher's answer (--timeout)",
                    ))
                })??
        }
        None => first_look.await?,
    };
    let state = if d.summary.state.is_finished() {
        Some(d.summary.state)
    } else {
        // Follow from the end of what is there: only the end matters.
        let followed = follow_log(
            &t.addr,
            t.token.as_deref(),
            &id,
            d.log_len,
            deadline,
            |_| {},
        );
        tokio::select! {
            r = followed => r?.map(|(state, _)| state),
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\ntinyci: stopped waiting; the run goes on. Cancel it with: tinyci cancel {id}");
                return Ok(code::INTERRUPTED);
            }
        }
    };
    let Some(state) = state else {
        if json {
            print_json(&json!({"id": id.as_str(), "status": "timeout"}));
        } else {
            eprintln!(
                "tinyci: {} is still not finished; waiting timed out",
                id.short()
            );
        }
        return Ok(code::NOT_FINISHED);
    };
    // The final record (steps, result file) once it is there.
    let d = t.connect().await?.run(id.as_str()).await?;
    if json {
        print_json(&detail_json(&d));
    } else {
        println!("{} {}", id, style.state(state));
    }
    Ok(state_code(state))
}

async fn submit(
    t: &Target,
    args: &[String],
    branch: Option<String>,
    front: bool,
    rerun: bool,
    json: bool,
) -> Result<u8, ClientError> {
    let mut ids = Vec::new();
    let mut client = None;
    for a in args {
        match name_commit(a)? {
            Named::Id(id) => match crate::git::look_up_here(&id) {
                crate::git::HereSays::NotACommit(what) => {
                    return Err(ClientError::NotFound(format!(
                        "{a} is {what} in the repository here, not a commit"
                    )))
                }
                crate::git::HereSays::Commit(c) => ids.push(c),
                crate::git::HereSays::Missing => {
                    eprintln!("tinyci: note: {id} is not in the repository here; if origin does not have it either (not pushed yet, or a typo), it waits in the queue until origin does (tinyci why {})", id.short());
                    ids.push(id);
                }
                crate::git::HereSays::NoRepository => ids.push(id),
            },
            // A prefix no repository here resolves: one the dispatcher knows (a re-run).
            Named::Prefix(p) => {
                let c = match &mut client {
                    Some(c) => c,
                    None => client.insert(t.connect().await?),
                };
                match c.run(&p).await {
                    Ok(d) => ids.push(d.summary.commit),
                    Err(ClientError::NotFound(_)) => {
                        return Err(ClientError::NotFound(format!(
                            "{p:?} names no commit the dispatcher knows: name the commit in full, or run tinyci inside a repository that has it"
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    let n = ids.len();
    let mut client = match client {
        Some(c) => c,
        None => t.connect().await?,
    };
    let s = client.submit(ids, branch, front, rerun).await?;
    if json {
        print_json(&json!({"queued": s.queued, "known": s.known}));
    } else {
        println!(
            "queued {} of {n} commit(s){}",
            s.queued,
            if s.known > 0 {
                format!(" ({} already known)", s.known)
            } else {
                String::new()
            }
        );
    }
    Ok(code::OK)
}

async fn cancel(t: &Target, arg: &str, json: bool) -> Result<u8, ClientError> {
    let mut c = t.connect().await?;
    let id = full_id(&mut c, arg).await?;
    let was = c.cancel(id.clone()).await?;
    if json {
        print_json(&json!({"id": id.as_str(), "was": was.as_str()}));
    } else if was.is_finished() {
        println!(
            "{} had already finished ({was}); nothing to cancel",
            id.short()
        );
    } else {
        println!("{} cancelled (it was {was})", id.short());
    }
    Ok(code::OK)
}

async fn why(t: &Target, arg: &str, json: bool) -> Result<u8, ClientError> {
    let mut c = t.connect().await?;
    let id = full_id(&mut c, arg).await?;
    let (state, reason) = c.why(id.clone()).await?;
    if json {
        print_json(&json!({"id": id.as_str(), "status": state.as_str(), "reason": reason}));
    } else {
        println!("{} is {state}: {reason}", id.short());
    }
    Ok(code::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_documented_table() {
        assert_eq!(state_code(RunState::Success), 0);
        assert_eq!(state_code(RunState::Failure), 1);
        assert_eq!(state_code(RunState::Error), 2);
        assert_eq!(state_code(RunState::Cancelled), 3);
        assert_eq!(state_code(RunState::Running), 4);
        assert_eq!(state_code(RunState::Queued), 4);
        assert_eq!(fail(&ClientError::NotRecorded("locked".into())), 75);
        assert_eq!(fail(&ClientError::Refused("full".into())), 70);
        assert_eq!(fail(&ClientError::NotFound("x".into())), 5);
    }

    #[test]
    fn commit_names_are_ids_prefixes_or_refused() {
        let full = "a".repeat(40);
        assert_eq!(
            name_commit(&full).unwrap(),
            Named::Id(CommitId::parse(&full).unwrap())
        );
        // Hex that no repository here resolves is a prefix for the dispatcher to complete
        // (the tests run inside this project's repository, which has no such commit).
        let r = (
            name_commit("abcd1234abcd"),
            name_commit("abc"),
            name_commit("../x"),
        );
        assert_eq!(r.0.unwrap(), Named::Prefix("abcd1234abcd".into()));
        assert!(matches!(r.1, Err(ClientError::NotFound(_))));
        assert!(matches!(r.2, Err(ClientError::NotFound(_))));
    }

    #[test]
    fn durations_and_colours_read_well() {
        assert_eq!(human_duration(812), "812ms");
        assert_eq!(human_duration(4200), "4.2s");
        assert_eq!(human_duration(63_000), "1m03s");
        let plain = Style { color: false };
        assert_eq!(plain.state(RunState::Failure), "failure");
        let coloured = Style { color: true };
        assert_eq!(coloured.state(RunState::Success), "\x1b[32msuccess\x1b[0m");
    }
}
