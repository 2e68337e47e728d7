//! Git hooks for the repository people push to: `tinyci hook install MASTER_REPO` writes
//!
//! - `post-receive`, which submits the pushed commits of the followed branch (oldest
//!   first) and streams their run into `git push`: `[step]` lines as they arrive, a
//!   "still running" line after silence, and the verdict with a per-step summary;
//! - `reference-transaction`, which nudges the observers (see
//!   [`crate::observer::nudge`]) the moment the branch moves, so they poll at once.
//!
//! A hook already there is kept: it is renamed `<hook>.before-tinyci` and run first, with
//! the same input, by ours.
//!
//! Every write to the pusher goes through a watchdog: git does not tell a hook that the
//! pusher has gone (Ctrl-C, a dropped ssh connection), and a hook blocked on a write would
//! keep `git-receive-pack` waiting forever. A write that fails or does not finish within
//! [`WRITE_TIMEOUT`] ends the hook quietly, and so does the death of a process above it
//! (the pusher's `git push`, or its ssh session); the run goes on.

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;
use tinyci_proto::{CommitId, RunState};

use super::cli::{code, render_detail, Style, Target};
use super::{follow_log, Client, ClientError, FollowEvent};

/// How long one write to the pusher may take before the hook gives up on them.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// After this much silence the hook says the run is still going.
pub const SILENCE: Duration = Duration::from_secs(10);

/// The line that marks a hook as tinyci's.
const MARKER: &str = "# Installed by `tinyci hook install`";

/// Where an existing hook is moved to be chained.
const CHAINED: &str = ".before-tinyci";

/// `tinyci hook …`
#[derive(Subcommand, Debug)]
pub enum HookCommand {
    /// Writes the post-receive and reference-transaction hooks into MASTER_REPO.
    Install {
        /// The repository people push to (bare or not).
        master_repo: PathBuf,
        /// The branch to test (default: the branch HEAD points at in MASTER_REPO).
        #[arg(long)]
        branch: Option<String>,
        /// How long a push waits for the verdict before it detaches.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        max_wait: Duration,
    },
    /// (Run by the post-receive hook.) Submits the pushed commits read from stdin and
    /// streams their run.
    #[command(hide = true)]
    PostReceive {
        /// The branch to test.
        #[arg(long)]
        branch: String,
        /// How long to wait for the verdict before detaching.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        max_wait: Duration,
    },
}

/// Runs a `hook` subcommand; returns the exit code.
pub async fn run(cmd: HookCommand, target: &Target) -> u8 {
    match cmd {
        HookCommand::Install {
            master_repo,
            branch,
            max_wait,
        } => match install(&master_repo, branch, max_wait, target) {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                code::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                code::USAGE
            }
        },
        HookCommand::PostReceive { branch, max_wait } => {
            post_receive(&branch, max_wait, target).await;
            // A post-receive hook cannot fail a push; say nothing more than it did.
            code::OK
        }
    }
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The post-receive hook's text.
fn post_receive_script(exe: &Path, target: &Target, branch: &str, max_wait: Duration) -> String {
    let token = target
        .token_file
        .as_ref()
        .map(|f| format!(" --token-file {}", sh_quote(&f.display().to_string())))
        .unwrap_or_default();
    format!(
        r#"#!/bin/sh
{MARKER}: submits the pushed commits of {branch}
# to the tinyci dispatcher and streams their run into `git push`.
# `git push -o ci.skip` skips the run; `-o tinyci.wait=no` submits without waiting.
input=$(cat)
if [ -x "$0{CHAINED}" ]; then
  printf '%s\n' "$input" | "$0{CHAINED}" "$@"
fi
printf '%s\n' "$input" | exec {exe} --dispatcher-server {addr}{token} hook post-receive --branch {b} --max-wait {wait}s
"#,
        exe = sh_quote(&exe.display().to_string()),
        addr = sh_quote(&target.addr),
        b = sh_quote(branch),
        wait = max_wait.as_secs().max(1),
    )
}

/// The reference-transaction hook's text: pure shell, no process of ours, so it costs git
/// next to nothing; it never blocks (a FIFO opened read-write never blocks on Linux).
fn reference_transaction_script(git_dir: &Path, branch: &str) -> String {
    format!(
        r#"#!/bin/sh
{MARKER}: nudges the tinyci observers
# (their FIFOs in {nudge}) the moment {branch} moves.
if [ -x "$0{CHAINED}" ]; then
  input=$(cat)
  printf '%s\n' "$input" | "$0{CHAINED}" "$@" || exit $?
  [ "$1" = committed ] || exit 0
  case "$input" in *" refs/heads/"{b}*) ;; *) exit 0 ;; esac
else
  [ "$1" = committed ] || exit 0
  moved=
  while read -r old new ref; do
    [ "$ref" = refs/heads/{b} ] && moved=1
  done
  [ -n "$moved" ] || exit 0
fi
for f in {nudge_q}/observer-*; do
  [ -p "$f" ] && {{ printf x 1<>"$f"; }} 2>/dev/null
done
exit 0
"#,
        nudge = git_dir.join(crate::observer::nudge::NUDGE_DIR).display(),
        nudge_q = sh_quote(
            &git_dir
                .join(crate::observer::nudge::NUDGE_DIR)
                .display()
                .to_string()
        ),
        b = sh_quote(branch),
    )
}

/// Writes `text` as hook `name` in `hooks`, chaining a foreign hook already there.
fn write_hook(hooks: &Path, name: &str, text: &str) -> std::io::Result<String> {
    let path = hooks.join(name);
    let mut said = format!("wrote {}", path.display());
    if let Ok(old) = std::fs::read(&path) {
        let ours = String::from_utf8_lossy(&old).contains(MARKER);
        if !ours {
            let kept = hooks.join(format!("{name}{CHAINED}"));
            if kept.exists() {
                return Err(std::io::Error::other(format!(
                    "{} exists and so does {}: move one of them away first",
                    path.display(),
                    kept.display()
                )));
            }
            std::fs::rename(&path, &kept)?;
            said = format!(
                "wrote {} (the hook that was there is now {} and runs first)",
                path.display(),
                kept.display()
            );
        }
    }
    let tmp = hooks.join(format!(".{name}.tinyci-tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &path)?;
    Ok(said)
}

/// `tinyci hook install`.
fn install(
    master: &Path,
    branch: Option<String>,
    max_wait: Duration,
    target: &Target,
) -> Result<Vec<String>, String> {
    let (git_dir, _bare) = crate::git::git_dir_of(master).map_err(|e| {
        format!(
            "{} is not a git repository ({e}); pass the repository people push to",
            master.display()
        )
    })?;
    let branch = match branch {
        Some(b) => b,
        None => crate::git::head_branch(master).map_err(|e| e.to_string())?,
    };
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the tinyci executable: {e}"))?;
    let hooks = hooks_dir(master, &git_dir);
    std::fs::create_dir_all(&hooks).map_err(|e| format!("creating {}: {e}", hooks.display()))?;
    let mut said = Vec::new();
    for (name, text) in [
        (
            "post-receive",
            post_receive_script(&exe, target, &branch, max_wait),
        ),
        (
            "reference-transaction",
            reference_transaction_script(&git_dir, &branch),
        ),
    ] {
        said.push(write_hook(&hooks, name, &text).map_err(|e| format!("hook {name}: {e}"))?);
    }
    // `git push -o ci.skip` needs the repository to accept push options.
    crate::git::set_config(master, "receive.advertisePushOptions", "true")
        .map_err(|e| e.to_string())?;
    said.push(format!(
        "pushes to {branch} now run on the dispatcher at {} and wait up to {} for the verdict",
        target.addr,
        humantime::format_duration(max_wait)
    ));
    Ok(said)
}

/// The hooks directory git uses for the repository: `core.hooksPath` if set, else
/// `<git dir>/hooks`.
fn hooks_dir(master: &Path, git_dir: &Path) -> PathBuf {
    match crate::git::get_config(master, "core.hooksPath") {
        Some(p) if Path::new(&p).is_absolute() => PathBuf::from(p),
        Some(p) => master.join(p),
        None => git_dir.join("hooks"),
    }
}

/// What the writer thread is handed.
enum Out {
    Bytes(Vec<u8>),
    /// Answered once everything before it is written.
    Flush(mpsc::Sender<()>),
}

/// Output to the pusher, through a writer thread watched for stalls.
struct Pusher {
    tx: mpsc::Sender<Out>,
}

impl Pusher {
    /// Starts the writer and its watchdog. When a write fails or stalls past `timeout`,
    /// the process exits quietly: the pusher is gone.
    fn start(timeout: Duration) -> Pusher {
        let (tx, rx) = mpsc::channel::<Out>();
        // Milliseconds since `epoch` (plus one) when the write in progress began; 0 when
        // the writer is idle.
        let busy_since = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let busy = busy_since.clone();
        std::thread::spawn(move || {
            let mut out = std::io::stdout();
            for item in rx {
                match item {
                    Out::Bytes(chunk) => {
                        busy.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
                        if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
                            std::process::exit(0);
                        }
                        busy.store(0, Ordering::SeqCst);
                    }
                    Out::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        let limit = timeout.as_millis() as u64;
        let family = ancestors();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let since = busy_since.load(Ordering::SeqCst);
            let now = epoch.elapsed().as_millis() as u64 + 1;
            if since != 0 && now.saturating_sub(since) > limit {
                std::process::exit(0);
            }
            if orphaned(&family) {
                std::process::exit(0);
            }
        });
        Pusher { tx }
    }

    fn say(&self, line: impl Into<String>) {
        let mut l = line.into();
        if !l.ends_with('\n') {
            l.push('\n');
        }
        let _ = self.tx.send(Out::Bytes(l.into_bytes()));
    }

    fn raw(&self, bytes: &[u8]) {
        let _ = self.tx.send(Out::Bytes(bytes.to_vec()));
    }

    /// Waits until everything handed over is written (a stall ends the process first).
    fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Out::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may itself hold parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// This process's ancestors as (pid, parent) pairs, nearest first, a few levels up: the
/// hook's shell, `git-receive-pack`, and what runs it for the pusher (`git push` itself
/// for a local push, the ssh session for a remote one).
fn ancestors() -> Vec<(u32, u32)> {
    let mut chain = Vec::new();
    let mut pid = std::process::id();
    for _ in 0..8 {
        let Some(parent) = parent_of(pid) else { break };
        chain.push((pid, parent));
        if parent <= 1 {
            break;
        }
        pid = parent;
    }
    chain
}

/// Whether a process above us died since `family` was taken (one of them was reparented
/// or is gone): the pusher went away. `git-receive-pack` drains a hook's output even when
/// nobody reads it any more, so this, not a failed write, is how a hook learns it.
fn orphaned(family: &[(u32, u32)]) -> bool {
    family
        .iter()
        .any(|(pid, parent)| parent_of(*pid) != Some(*parent))
}

/// What the pusher asked for with `git push -o …`.
#[derive(Debug, Default, PartialEq, Eq)]
struct PushOptions {
    skip: bool,
    no_wait: bool,
}

fn push_options() -> PushOptions {
    let n: usize = std::env::var("GIT_PUSH_OPTION_COUNT")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut o = PushOptions::default();
    for i in 0..n.min(100) {
        match std::env::var(format!("GIT_PUSH_OPTION_{i}")).as_deref() {
            Ok("ci.skip") | Ok("tinyci.skip") => o.skip = true,
            Ok("tinyci.wait=no") => o.no_wait = true,
            _ => {}
        }
    }
    o
}

/// The branch updates read from a post-receive hook's stdin: (old, new) of `branch`.
fn updates(input: impl BufRead, branch: &str) -> Vec<(String, CommitId)> {
    let want = format!("refs/heads/{branch}");
    input
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (old, new, name) = (f.next()?, f.next()?, f.next()?);
            if name != want {
                return None;
            }
            // A deleted branch (new is all zeros) has nothing to test.
            if new.bytes().all(|b| b == b'0') {
                return None;
            }
            let new = CommitId::parse(new).ok()?;
            Some((old.to_owned(), new))
        })
        .collect()
}

/// The post-receive hook's work.
async fn post_receive(branch: &str, max_wait: Duration, target: &Target) {
    let pusher = Pusher::start(WRITE_TIMEOUT);
    let style = Style {
        color: std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty()),
    };
    let pushed = updates(std::io::stdin().lock(), branch);
    if pushed.is_empty() {
        return;
    }
    let opts = push_options();
    if opts.skip {
        pusher.say("tinyci: ci.skip: not submitted");
        pusher.flush();
        return;
    }
    let mut commits: Vec<CommitId> = Vec::new();
    for (old, new) in &pushed {
        match crate::git::pushed_commits(old, new, 1000) {
            Ok(cs) => commits.extend(cs),
            Err(e) => {
                pusher.say(format!(
                    "tinyci: cannot list the pushed commits ({e}); submitting the tip only"
                ));
                commits.push(new.clone());
            }
        }
    }
    let tips: Vec<CommitId> = pushed.iter().map(|(_, n)| n.clone()).collect();
    let submitted = async {
        let mut c = Client::connect(&target.addr, target.token.as_deref()).await?;
        c.submit(commits.clone(), Some(branch.to_owned()), false, false)
            .await
    }
    .await;
    match submitted {
        Ok(s) => pusher.say(format!(
            "tinyci: queued {} commit(s) on {branch}{}",
            s.queued,
            if s.known > 0 {
                format!(" ({} already known)", s.known)
            } else {
                String::new()
            }
        )),
        // Taken, and queued in the dispatcher, but not yet in its database: the runs
        // happen once it can write again, so waiting for them still makes sense.
        Err(ClientError::NotRecorded(why)) => pusher.say(format!(
            "tinyci: the dispatcher took the commits but could not record them yet ({why}); they run once its database works again"
        )),
        Err(e) => {
            pusher.say(format!(
                "tinyci: could not submit to the dispatcher at {} ({e}); the observer will pick the commits up",
                target.addr
            ));
            pusher.flush();
            return;
        }
    }
    if opts.no_wait {
        for t in &tips {
            pusher.say(format!(
                "tinyci: not waiting; follow it with: tinyci logs -f {t}"
            ));
        }
        pusher.flush();
        return;
    }
    let give_up = tokio::time::Instant::now() + max_wait;
    for tip in &tips {
        stream_run(&pusher, target, tip, give_up, max_wait, style).await;
    }
    pusher.flush();
}

/// Streams one run's log to the pusher, then its verdict.
async fn stream_run(
    pusher: &Pusher,
    target: &Target,
    tip: &CommitId,
    give_up: tokio::time::Instant,
    max_wait: Duration,
    style: Style,
) {
    pusher.say(format!("tinyci: running {} …", tip.short()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let addr = target.addr.clone();
    let token = target.token.clone();
    let id = tip.clone();
    let follow = tokio::spawn(async move {
        follow_log(&addr, token.as_deref(), &id, 0, Some(give_up), |ev| {
            if let FollowEvent::Data(d) = ev {
                let _ = tx.send(d.to_vec());
            }
        })
        .await
    });
    let mut step: Option<(String, Instant)> = None;
    let mut partial = Vec::new();
    loop {
        match tokio::time::timeout(SILENCE, rx.recv()).await {
            Ok(Some(bytes)) => {
                pusher.raw(&bytes);
                partial.extend_from_slice(&bytes);
                while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=nl).collect();
                    if let Some(name) = step_of(&line) {
                        if step.as_ref().map_or(true, |(s, _)| *s != name) {
                            step = Some((name, Instant::now()));
                        }
                    }
                }
                if partial.len() > 4096 {
                    partial.clear();
                }
            }
            Ok(None) => break,
            Err(_) => match &step {
                Some((name, since)) => pusher.say(format!(
                    "tinyci: still running: {name} {} s",
                    since.elapsed().as_secs()
                )),
                None => pusher.say("tinyci: still waiting for a runner"),
            },
        }
    }
    let ended = follow.await.ok().and_then(|r| r.ok()).flatten();
    let Some((state, _)) = ended else {
        pusher.say(format!(
            "tinyci: still running after {}; follow it with: tinyci logs -f {tip}",
            humantime::format_duration(max_wait)
        ));
        return;
    };
    let detail = async {
        Client::connect(&target.addr, target.token.as_deref())
            .await?
            .run(tip.as_str())
            .await
    }
    .await;
    match detail {
        Ok(d) => {
            pusher.say(format!(
                "tinyci: {} {}",
                tip.short(),
                style.state(d.summary.state)
            ));
            pusher.raw(render_detail(&d, style).as_bytes());
        }
        Err(ClientError::NotFound(_)) | Err(_) => {
            pusher.say(format!("tinyci: {} {}", tip.short(), style.state(state)))
        }
    }
    if state != RunState::Success {
        pusher.say(format!("tinyci: the full log: tinyci logs {tip}"));
    }
}

/// The step a log line belongs to: `[name] …` → `name` (not tinyci's own `[tinyci]`).
fn step_of(line: &[u8]) -> Option<String> {
    let rest = line.strip_prefix(b"[")?;
    let end = rest.iter().position(|b| *b == b']')?;
    let name = std::str::from_utf8(&rest[..end]).ok()?;
    (name != "tinyci" && !name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_receive_input_is_read_for_the_followed_branch_only() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let z = "0".repeat(40);
        let input = format!(
            "{a} {b} refs/heads/main\n{z} {a} refs/heads/other\n{b} {z} refs/heads/main\ngarbage\n"
        );
        let got = updates(input.as_bytes(), "main");
        assert_eq!(got, vec![(a.clone(), CommitId::parse(&b).unwrap())]);
    }

    #[test]
    fn step_names_come_from_line_prefixes() {
        assert_eq!(step_of(b"[test] ok\n").as_deref(), Some("test"));
        assert_eq!(step_of(b"[tinyci] attempt 1\n"), None);
        assert_eq!(step_of(b"plain\n"), None);
    }

    #[test]
    fn an_existing_hook_is_chained_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = dir.path();
        std::fs::write(hooks.join("post-receive"), "#!/bin/sh\necho mine\n").unwrap();
        let said = write_hook(hooks, "post-receive", &format!("{MARKER}\n")).unwrap();
        assert!(said.contains("runs first"), "{said}");
        assert_eq!(
            std::fs::read_to_string(hooks.join("post-receive.before-tinyci")).unwrap(),
            "#!/bin/sh\necho mine\n"
        );
        // Installing again replaces ours and keeps the chained one.
        write_hook(hooks, "post-receive", &format!("{MARKER} v2\n")).unwrap();
        assert!(std::fs::read_to_string(hooks.join("post-receive"))
            .unwrap()
            .contains("v2"));
        assert!(hooks.join("post-receive.before-tinyci").exists());
        // A second foreign hook with one already chained is refused, not overwritten.
        std::fs::write(hooks.join("post-receive"), "#!/bin/sh\necho other\n").unwrap();
        assert!(write_hook(hooks, "post-receive", MARKER).is_err());
        assert_eq!(
            std::fs::read_to_string(hooks.join("post-receive")).unwrap(),
            "#!/bin/sh\necho other\n"
        );
    }

    #[test]
    fn our_family_is_intact_until_an_ancestor_dies() {
        let family = ancestors();
        assert!(!family.is_empty());
        assert_eq!(family[0].0, std::process::id());
        assert!(!orphaned(&family));
        // A pid that cannot exist stands for a process that died.
        assert!(orphaned(&[(4_194_399, 1)]));
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
