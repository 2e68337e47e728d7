//! The `tinyci` command and the git hooks, against the real binaries: every command and
//! its exit code, a log followed across a dispatcher restart, a `git push` that shows the
//! run, a pusher that vanishes, and a local commit noticed without waiting for the poll.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use testkit::*;

fn bins() -> Bins {
    testkit::bins!()
}

/// Runs `tinyci ARGS` against the cluster's dispatcher, in `dir` (the master by default).
fn tinyci_in(c: &Cluster, dir: &Path, args: &[&str]) -> Result<Output> {
    Command::new(&c.bins.tinyci)
        .arg("--dispatcher-server")
        .arg(&c.addr)
        .args(args)
        .current_dir(dir)
        .env_remove("TINYCI_TOKEN")
        .env_remove("TINYCI_DISPATCHER")
        .stdin(Stdio::null())
        .output()
        .context("running tinyci")
}

fn tinyci(c: &Cluster, args: &[&str]) -> Result<Output> {
    tinyci_in(c, &c.master.dir, args)
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> Result<Value> {
    serde_json::from_slice(&o.stdout).with_context(|| text(o))
}

/// Polls `tinyci status --json` until `ok` holds: readiness through the typed status.
fn wait_status(c: &Cluster, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let o = tinyci(c, &["--json", "status"])?;
        if o.status.success() {
            let v = json(&o)?;
            if ok(&v) {
                return Ok(v);
            }
        }
        if Instant::now() > deadline {
            bail!("status never got there; last: {}", text(&o));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A dispatcher alone: the test starts the runners and the observer it needs.
fn no_processes() -> Opts {
    Opts {
        runners: 0,
        ..no_observer()
    }
}

fn no_observer() -> Opts {
    Opts {
        observer: false,
        ..Opts::default()
    }
}

#[test]
fn commands_answer_with_tables_json_and_documented_exit_codes() -> Result<()> {
    let c = Cluster::start(bins(), no_observer())?;
    wait_status(&c, |v| {
        v["runners"].as_array().is_some_and(|r| r.len() == 1)
    })?;

    // submit + wait + show on a passing commit, named by ref in the current repository.
    let good = c.master.head()?;
    let o = tinyci(&c, &["submit", "HEAD", "--branch", "master"])?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("queued 1 of 1"), "{}", text(&o));
    let o = tinyci(&c, &["submit", &good])?;
    assert!(text(&o).contains("already known"), "{}", text(&o));
    let o = tinyci(&c, &["wait", &good, "--timeout", "30s"])?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    // Finished: any timeout tells it, none too short or too long.
    for t in ["0s", "18446744073709551615s"] {
        let o = tinyci(&c, &["wait", &good, "--timeout", t])?;
        assert_eq!(code(&o), 0, "--timeout {t}: {}", text(&o));
    }
    let o = tinyci(&c, &["show", &good[..10]])?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("status   success") && t.contains("test"), "{t}");
    assert!(!t.contains('\x1b'), "no colour when not on a terminal: {t}");
    let v = json(&tinyci(&c, &["--json", "show", &good])?)?;
    assert_eq!(v["status"], "success");
    assert_eq!(v["branch"], "master");
    assert_eq!(v["steps"][0]["name"], "check");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(c.json_path(&good))?)?;
    assert_eq!(v["attempts"], on_disk["attempts"]);
    let o = tinyci(&c, &["logs", &good])?;
    assert_eq!(code(&o), 0);
    assert_eq!(
        o.stdout,
        std::fs::read(c.results.join(format!("{good}.log")))?
    );

    // A failing commit: exit 1; an erroring one (bad spec): exit 2.
    let bad = c.commit(
        "fails",
        &[(".tinyci.toml", &spec(&[("test", "exit 3", "1m")]))],
    )?;
    tinyci(&c, &["submit", &bad])?;
    let o = tinyci(&c, &["wait", &bad])?;
    assert_eq!(code(&o), 1, "{}", text(&o));
    let broken = c.commit("broken spec", &[(".tinyci.toml", "[[steps]\n")])?;
    tinyci(&c, &["submit", &broken])?;
    assert_eq!(code(&tinyci(&c, &["wait", &broken])?), 2);
    let o = tinyci(&c, &["show", &bad])?;
    assert_eq!(code(&o), 1);

    // runs: the list, filtered.
    let v = json(&tinyci(&c, &["--json", "runs"])?)?;
    assert_eq!(v["total"], 3, "{v}");
    assert_eq!(v["data"][0]["id"], broken.as_str(), "newest first: {v}");
    let v = json(&tinyci(&c, &["--json", "runs", "--status", "failure"])?)?;
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["data"][0]["failed_steps"][0], "test");
    let o = tinyci(&c, &["runs", "--limit", "1"])?;
    assert!(text(&o).contains("1 of 3"), "{}", text(&o));

    // A slow commit: wait times out (4), why says it runs, cancel stops it (3).
    let pid_file = c.tmp.path().join("step.pid");
    let slow = c.commit(
        "slow",
        &[(
            ".tinyci.toml",
            &spec(&[(
                "slow",
                &format!("echo $$ > {}; sleep 600", pid_file.display()),
                "20m",
            )]),
        )],
    )?;
    tinyci(&c, &["submit", &slow])?;
    let o = tinyci(&c, &["wait", &slow, "--timeout", "300ms"])?;
    assert_eq!(code(&o), 4, "{}", text(&o));
    wait_status(&c, |v| v["running"][0]["id"] == slow.as_str())?;
    let o = tinyci(&c, &["why", &slow])?;
    assert!(text(&o).contains("is running: attempt 1"), "{}", text(&o));
    // A queued commit behind it says why it waits.
    let queued = c.commit(
        "behind",
        &[(".tinyci.toml", &spec(&[("quick", "echo quick", "1m")]))],
    )?;
    tinyci(&c, &["submit", &queued])?;
    let o = tinyci(&c, &["why", &queued])?;
    assert!(text(&o).contains("busy"), "{}", text(&o));
    let v = json(&tinyci(&c, &["--json", "runners"])?)?;
    assert_eq!(v[0]["state"], "busy");
    assert_eq!(v[0]["commit"], slow.as_str());
    let deadline = Instant::now() + WAIT;
    while !pid_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let step_pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    let o = tinyci(&c, &["cancel", &slow])?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = tinyci(&c, &["wait", &slow, "--timeout", "30s"])?;
    assert_eq!(code(&o), 3, "{}", text(&o));
    let r = c.wait_result(&slow, WAIT)?;
    assert_eq!(r["status"], "cancelled", "{r}");
    // SAFETY-free check: signal 0 only asks whether the process exists.
    assert!(
        unsafe { libc::kill(step_pid, 0) } != 0,
        "the cancelled step's process is gone"
    );
    // The commit behind it then runs.
    assert_eq!(code(&tinyci(&c, &["wait", &queued])?), 0);

    // Unknown commit: 5. Usage: 64. Unreachable dispatcher: 69.
    assert_eq!(code(&tinyci(&c, &["show", "deadbeef"])?), 5);
    assert_eq!(code(&tinyci(&c, &["show", &"e".repeat(40)])?), 5);
    assert_eq!(code(&tinyci(&c, &["frobnicate"])?), 64);
    assert_eq!(code(&tinyci(&c, &["runs", "--status", "bogus"])?), 64);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let o = Command::new(&c.bins.tinyci)
        .args(["--dispatcher-server", &closed.to_string(), "status"])
        .output()?;
    assert_eq!(code(&o), 69, "{}", text(&o));
    Ok(())
}

#[test]
fn front_submissions_jump_the_queue_reruns_run_again_and_a_wrong_token_is_refused() -> Result<()> {
    let c = Cluster::start(
        bins(),
        Opts {
            observer: false,
            token: Some("s3cret".into()),
            ..Opts::default()
        },
    )?;
    let with_token = |args: &[&str]| -> Result<Output> {
        Command::new(&c.bins.tinyci)
            .args(["--dispatcher-server", &c.addr])
            .args(args)
            .current_dir(&c.master.dir)
            .env("TINYCI_TOKEN", "s3cret")
            .output()
            .context("running tinyci")
    };
    // Without the token, or with the wrong one: refused for good (78), saying why.
    let o = tinyci(&c, &["status"])?;
    assert_eq!(code(&o), 78, "{}", text(&o));
    assert!(text(&o).contains("token"), "{}", text(&o));
    let o = Command::new(&c.bins.tinyci)
        .args(["--dispatcher-server", &c.addr, "status"])
        .env("TINYCI_TOKEN", "wrong")
        .output()?;
    assert_eq!(code(&o), 78, "{}", text(&o));

    // Keep the runner busy, queue two, then one at the front.
    let hold = c.tmp.path().join("hold");
    std::fs::write(&hold, "")?;
    let busy = c.commit(
        "busy",
        &[(
            ".tinyci.toml",
            &spec(&[(
                "wait",
                &format!("while [ -e {} ]; do sleep 0.05; done", hold.display()),
                "1m",
            )]),
        )],
    )?;
    assert!(with_token(&["submit", &busy])?.status.success());
    let quick = spec(&[("quick", "true", "1m")]);
    let a = c.commit("a", &[(".tinyci.toml", &quick), ("a", "1")])?;
    let b = c.commit("b", &[("b", "1")])?;
    let first = c.commit("first", &[("f", "1")])?;
    assert!(with_token(&["submit", &a, &b])?.status.success());
    assert!(with_token(&["submit", "--front", &first])?.status.success());
    let o = with_token(&["--json", "status"])?;
    let v = json(&o)?;
    let order: Vec<&str> = v["queue"]
        .as_array()
        .context("queue")?
        .iter()
        .filter_map(|q| q["id"].as_str())
        .collect();
    assert_eq!(order, [first.as_str(), a.as_str(), b.as_str()], "{v}");
    std::fs::remove_file(&hold)?;
    for sha in [&busy, &first, &a, &b] {
        assert_eq!(code(&with_token(&["wait", sha])?), 0);
    }

    // A finished commit is known; --rerun runs it again, and its log goes on.
    let o = with_token(&["submit", &a])?;
    assert!(text(&o).contains("queued 0 of 1"), "{}", text(&o));
    let o = with_token(&["submit", "--rerun", &a])?;
    assert!(text(&o).contains("queued 1 of 1"), "{}", text(&o));
    assert_eq!(code(&with_token(&["wait", &a])?), 0);
    let v = json(&with_token(&["--json", "show", &a])?)?;
    assert_eq!(
        v["attempt_history"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    let log = c.log_text(&a);
    assert_eq!(
        log.matches("[tinyci] attempt 1 on runner").count(),
        2,
        "{log}"
    );
    Ok(())
}

/// A commit submitted before it is pushed is no verdict: origin's "no such commit" uses no
/// attempt, the commit waits in the queue saying why, and it runs once it is pushed. (It
/// was given up as `error` after three quick attempts, and the push that followed was
/// answered "already known": the commit was never tested.)
#[test]
fn a_commit_submitted_before_its_push_waits_for_it_and_runs() -> Result<()> {
    let c = Cluster::start(bins(), no_observer())?;
    wait_status(&c, |v| {
        v["runners"].as_array().is_some_and(|r| r.len() == 1)
    })?;
    let work = c.master.clone_to(&c.tmp.path().join("work"))?;
    let sha = commit_in(&work, "not pushed yet", &[("new", "1")])?;
    let o = tinyci_in(&c, &work, &["submit", &sha])?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    c.dispatcher().wait_for(
        &["origin has no such commit", &format!("commit={sha}")],
        WAIT,
    )?;
    let o = tinyci(&c, &["why", &sha])?;
    assert!(text(&o).contains("not pushed yet?"), "{}", text(&o));
    // Mistakes the repository here can catch: an object that is not a commit is refused,
    // an id it does not have is taken with a note.
    let blob = git(&work, &["rev-parse", "HEAD:new"])?;
    let o = tinyci_in(&c, &work, &["submit", &blob])?;
    assert_eq!(code(&o), 5, "{}", text(&o));
    assert!(text(&o).contains("is a blob"), "{}", text(&o));
    let typo = "0123456789".repeat(4);
    let o = tinyci(&c, &["submit", &typo])?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        text(&o).contains("is not in the repository here"),
        "{}",
        text(&o)
    );
    assert_eq!(code(&tinyci(&c, &["cancel", &typo])?), 0);
    // Outside any repository, a prefix of a commit the dispatcher knows is completed.
    let o = tinyci_in(&c, c.tmp.path(), &["submit", &sha[..12]])?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("queued 0 of 1"), "{}", text(&o));
    let o = tinyci(&c, &["show", &sha])?;
    assert_eq!(code(&o), 4, "queued, not finished: {}", text(&o));
    assert!(
        !c.json_path(&sha).exists(),
        "a verdict for an unpushed commit"
    );

    // Pushed (into a branch of the master, the runners' origin): it runs, on its first
    // counted attempt, and passes.
    git(
        &c.master.dir,
        &["fetch", "-q", &work.display().to_string(), "HEAD:pushed"],
    )?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert!(
        c.log_text(&sha).contains("ended without a result"),
        "the miss is in the log: {}",
        c.log_text(&sha)
    );
    Ok(())
}

/// `wait --timeout` bounds the whole wait: a dispatcher that accepts and never answers
/// (frozen) is given up at the timeout, not at the 5 s hello deadline, as unreachable.
#[test]
fn wait_timeout_bounds_a_dispatcher_that_never_answers() -> Result<()> {
    let frozen = testkit::origins::HangingServer::start()?;
    let o = Command::new(bins().tinyci)
        .args(["--dispatcher-server", &frozen.addr.to_string()])
        .args(["wait", &"ab".repeat(20), "--timeout", "1s"])
        .env_remove("TINYCI_TOKEN")
        .env_remove("TINYCI_DISPATCHER")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(code(&o), 69, "{}", text(&o));
    assert!(text(&o).contains("(--timeout)"), "{}", text(&o));
    Ok(())
}

#[test]
fn a_followed_log_survives_a_dispatcher_restart_without_a_line_twice() -> Result<()> {
    let mut c = Cluster::start(bins(), no_observer())?;
    wait_status(&c, |v| {
        v["runners"].as_array().is_some_and(|r| r.len() == 1)
    })?;
    let sha = c.commit(
        "chatty",
        &[(
            ".tinyci.toml",
            &spec(&[(
                "count",
                "for i in $(seq 1 40); do echo line $i; sleep 0.1; done",
                "1m",
            )]),
        )],
    )?;
    tinyci(&c, &["submit", &sha])?;
    let out = c.tmp.path().join("followed.txt");
    let follower = Command::new(&c.bins.tinyci)
        .args(["--dispatcher-server", &c.addr, "logs", "-f", &sha])
        .stdout(std::fs::File::create(&out)?)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut follower = KillOnDrop(follower);
    // Mid-run: the dispatcher dies and comes back on the same port.
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&out)?.contains("line 10") {
        if Instant::now() > deadline {
            bail!("the follower saw no output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.restart_dispatcher()?;
    let status = wait_child(&mut follower.0, WAIT)?;
    assert!(status.success(), "{status:?}");
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success");
    let followed = std::fs::read(&out)?;
    let log = std::fs::read(c.results.join(format!("{sha}.log")))?;
    assert_eq!(
        String::from_utf8_lossy(&followed),
        String::from_utf8_lossy(&log),
        "the follower printed exactly the log"
    );
    Ok(())
}

#[test]
fn ctrl_c_while_following_detaches_and_says_how_to_cancel() -> Result<()> {
    let c = Cluster::start(bins(), no_observer())?;
    wait_status(&c, |v| {
        v["runners"].as_array().is_some_and(|r| r.len() == 1)
    })?;
    let sha = c.commit(
        "long",
        &[(
            ".tinyci.toml",
            &spec(&[("long", "echo go; sleep 30", "1m")]),
        )],
    )?;
    tinyci(&c, &["submit", &sha])?;
    wait_status(&c, |v| v["running"][0]["id"] == sha.as_str())?;
    let child = Command::new(&c.bins.tinyci)
        .args(["--dispatcher-server", &c.addr, "logs", "-f", &sha])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = KillOnDrop(child);
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let status = wait_child(&mut child.0, WAIT)?;
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().expect("piped"), &mut err)?;
    assert!(err.contains(&format!("tinyci cancel {sha}")), "{err}");
    // The run goes on.
    let v = json(&tinyci(&c, &["--json", "show", &sha])?)?;
    assert_eq!(v["status"], "running");
    Ok(())
}

/// A bare master people push to, with the hooks installed; runners and the observer clone
/// it. Returns (bare path, a work clone to push from).
fn push_setup(c: &mut Cluster, observer: bool) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let bare = c.tmp.path().join("pushed.git");
    git(
        c.tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            &c.master.dir.display().to_string(),
            "pushed.git",
        ],
    )?;
    let bare_url = bare.display().to_string();
    let setup = CloneSetup {
        clone_from: Some(bare_url.clone()),
        ..CloneSetup::default()
    };
    c.add_runner_with(&setup)?;
    if observer {
        let obs = c.tmp.path().join("obs_of_bare");
        clone_url(&bare_url, &obs, &[])?;
        let p = c.spawn_observer_on(&obs, &CloneSetup::default())?;
        p.wait_for(&["watching"], WAIT)?;
        c.observer = Some(p);
    }
    let o = Command::new(&c.bins.tinyci)
        .args(["--dispatcher-server", &c.addr, "hook", "install"])
        .arg(&bare)
        .args(["--max-wait", "2m"])
        .output()?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let work = c.tmp.path().join("work");
    clone_url(&bare_url, &work, &[])?;
    Ok((bare, work))
}

fn commit_in(dir: &Path, msg: &str, files: &[(&str, &str)]) -> Result<String> {
    for (p, body) in files {
        std::fs::write(dir.join(p), body)?;
    }
    git(dir, &["add", "-A"])?;
    git(
        dir,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            msg,
        ],
    )?;
    git(dir, &["rev-parse", "HEAD"])
}

#[test]
fn git_push_shows_the_run_and_its_verdict() -> Result<()> {
    let mut c = Cluster::start(bins(), no_processes())?;
    let (_bare, work) = push_setup(&mut c, false)?;
    let sha = commit_in(
        &work,
        "pushed",
        &[(
            ".tinyci.toml",
            &spec(&[
                ("build", "echo building", "1m"),
                ("test", "echo testing; exit 0", "1m"),
            ]),
        )],
    )?;
    let o = Command::new("git")
        .args(["push", "-q", "origin", "HEAD"])
        .current_dir(&work)
        .env("NO_COLOR", "1")
        .output()?;
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("remote: [build] building"), "{t}");
    assert!(t.contains("remote: [test] testing"), "{t}");
    assert!(
        t.contains(&format!("remote: tinyci: {} success", &sha[..10])),
        "{t}"
    );
    assert!(
        t.contains(&format!("{sha}.json")),
        "the result file is named: {t}"
    );
    assert_eq!(c.wait_result(&sha, WAIT)?["status"], "success");

    // ci.skip: nothing submitted.
    let skipped = commit_in(&work, "skip me", &[("y", "2")])?;
    let o = Command::new("git")
        .args(["push", "-q", "-o", "ci.skip", "origin", "HEAD"])
        .current_dir(&work)
        .output()?;
    assert!(text(&o).contains("ci.skip"), "{}", text(&o));
    assert_eq!(code(&tinyci(&c, &["show", &skipped])?), 5);
    Ok(())
}

#[test]
fn a_pusher_that_vanishes_leaves_no_hook_behind() -> Result<()> {
    let mut c = Cluster::start(bins(), no_processes())?;
    let (bare, work) = push_setup(&mut c, false)?;
    let sha = commit_in(
        &work,
        "slow",
        &[(
            ".tinyci.toml",
            &spec(&[("slow", "while true; do echo tick; sleep 0.05; done", "5m")]),
        )],
    )?;
    let push = Command::new("git")
        .args(["push", "origin", "HEAD"])
        .current_dir(&work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut push = KillOnDrop(push);
    wait_status(&c, |v| v["running"][0]["id"] == sha.as_str())?;
    // The pusher goes away without a word (a dropped connection, a closed laptop).
    push.0.kill()?;
    let _ = push.0.wait();
    let hook_alive = || hook_processes(&bare);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hook_alive().is_empty() {
        if Instant::now() > deadline {
            bail!("hook processes still alive: {:?}", hook_alive());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The run goes on without its pusher.
    let v = json(&tinyci(&c, &["--json", "show", &sha])?)?;
    assert_eq!(v["status"], "running");
    Ok(())
}

/// Pids of `tinyci hook post-receive` processes running in `bare`.
fn hook_processes(bare: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let want = std::fs::canonicalize(bare).unwrap_or_else(|_| bare.to_owned());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !cmd.windows(12).any(|w| w == b"post-receive") {
            continue;
        }
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        if cwd.starts_with(&want) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_local_commit_in_a_master_with_the_hook_is_seen_without_waiting_for_the_poll() -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 1,
            observer: false,
            poll_interval: "1h",
            ..Opts::default()
        },
    )?;
    let o = Command::new(&c.bins.tinyci)
        .args(["--dispatcher-server", &c.addr, "hook", "install"])
        .arg(&c.master.dir)
        .output()?;
    assert_eq!(code(&o), 0, "{}", text(&o));
    c.start_observer()?;
    // The observer's first poll reports the tip; everything after it needs the nudge.
    let first = c.master.head()?;
    c.wait_result(&first, WAIT)?;
    let sha = c.commit("nudged", &[("n", "1")])?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success");
    Ok(())
}

/// Kills the child on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_child(
    child: &mut std::process::Child,
    within: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            bail!("child still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
