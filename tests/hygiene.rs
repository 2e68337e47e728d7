//! What a step can and cannot see or leave behind, and how the binaries fail: no step process
//! outlives its runner, a step's environment carries no secret, tokens that would turn
//! authentication off are refused, and permanent errors (bad address, refused hello, a
//! peer that is not tinyci) end a process at once with a message that says what to fix.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::*;
use tinyci::proto::{encode, HelloReply};

fn bins() -> Bins {
    testkit::bins!()
}

/// Runs `cmd` until it exits (killing it past `within`); returns its status and stderr.
fn run_to_exit(mut cmd: Command, within: Duration) -> Result<(ExitStatus, String)> {
    let log = tempfile::NamedTempFile::new()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen()?)
        .env("RUST_LOG", "info");
    let mut child = cmd.spawn().context("starting the binary")?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "still running after {within:?}; stderr:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((status, std::fs::read_to_string(log.path())?))
}

/// The last line of a process's stderr: where `main` prints its error.
fn last_line(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or("")
}

/// The command lines of the live processes of `sha`'s steps.
fn step_cmdlines(sha: &str) -> Vec<String> {
    step_processes(sha)
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect()
}

/// A runner command for `clone` talking to `dispatcher`, on a port range of its own.
fn runner_cmd(clone: &Path, dispatcher: &str) -> Command {
    let mut cmd = Command::new(&bins().runner);
    cmd.args(["--host", "127.0.0.1", "--port-range"])
        .arg(runner_port_range())
        .args(["--dispatcher-server", dispatcher])
        .arg(clone)
        .env_remove("TINYCI_TOKEN");
    cmd
}

fn observer_cmd(clone: &Path, dispatcher: &str) -> Command {
    let mut cmd = Command::new(&bins().observer);
    cmd.args([
        "--dispatcher-server",
        dispatcher,
        "--poll-interval",
        "100ms",
    ])
    .arg(clone)
    .env_remove("TINYCI_TOKEN");
    cmd
}

// ---------------------------------------------------------------------------------------
// No orphans (issue 9, item 6)

#[test]
fn no_step_process_is_alive_one_second_after_kill_9_of_its_runner() -> Result<()> {
    let mut c = Cluster::start_ready(bins(), Opts::default())?;
    let mark = c.tmp.path().join("started");
    let run = format!(
        "sleep 300 & \
         nohup sleep 301 >/dev/null 2>&1 & \
         (sleep 302 &) ; \
         setsid sleep 303 & \
         sh -c 'trap \"\" TERM HUP INT; sleep 304' & \
         touch {m}; sleep 305",
        m = mark.display()
    );
    let sha = c.commit(
        "a step with daemons of every kind",
        &[(".tinyci.toml", &spec(&[("daemons", &run, "5m")]))],
    )?;
    wait_until("the step and its daemons to start", WAIT, || {
        let lines = step_cmdlines(&sha);
        mark.exists()
            && (300..=305).all(|n| lines.iter().any(|l| l.contains(&format!("sleep {n}"))))
    })?;
    let before = step_cmdlines(&sha);
    let killed_at = Instant::now();
    c.runners[0].kill();
    let gone = wait_until("every step process to die", Duration::from_secs(1), || {
        step_processes(&sha).is_empty()
    });
    let took = killed_at.elapsed();
    eprintln!(
        "{} step processes gone {took:?} after kill -9 of the runner",
        before.len()
    );
    if let Err(e) = gone {
        bail!(
            "{e}; still alive: {:?} (were: {before:?})",
            step_cmdlines(&sha)
        );
    }
    Ok(())
}

#[test]
fn a_step_that_kills_its_supervisor_leaves_nothing_behind() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let run = "setsid sleep 306 & sleep 307 & sleep 0.3; kill -9 $PPID; sleep 308";
    let sha = c.commit(
        "kills its supervisor",
        &[(".tinyci.toml", &spec(&[("rogue", run, "5m")]))],
    )?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "failure", "{r}");
    wait_until(
        "the step's orphans to be swept",
        Duration::from_secs(5),
        || step_processes(&sha).is_empty(),
    )
    .with_context(|| format!("still alive: {:?}", step_cmdlines(&sha)))?;
    assert!(
        c.log_text(&sha).contains("processes it left behind"),
        "{}",
        c.log_text(&sha)
    );
    Ok(())
}

#[test]
fn a_step_ends_at_its_first_failing_command() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let sha = c.commit(
        "multi-line run",
        &[(
            ".tinyci.toml",
            "[[steps]]\nname = \"lines\"\nrun = \"\"\"\necho first\nfalse\necho never printed\n\"\"\"\n",
        )],
    )?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "failure", "{r}");
    assert_eq!(r["steps"][0]["exit_code"], 1, "{r}");
    let log = c.log_text(&sha);
    assert!(log.contains("[lines] first"), "{log}");
    assert!(!log.contains("never printed"), "{log}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Secrets stay secret (issue 9, item 7)

#[test]
fn env_in_a_step_shows_no_token_and_no_tinyci_setting() -> Result<()> {
    let token = "s3cret-do-not-print";
    let c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            token: Some(token.into()),
            ..Opts::default()
        },
    )?;
    // A runner started with the token in its environment, a tinyci setting of its own and
    // git variables that would point a step's git at another repository.
    let clone = c.master.clone_to(&c.tmp.path().join("env_runner_clone"))?;
    let mut cmd = runner_cmd(&clone, &c.addr);
    cmd.env("TINYCI_TOKEN", token)
        .env("TINYCI_SOMETHING", "tinyci-setting-value")
        .env("GIT_DIR", "/nonexistent/.git")
        .env("GIT_WORK_TREE", "/nonexistent")
        .env("MY_OWN_VAR", "kept");
    let _runner = Proc::spawn("env_runner", cmd)?;
    c.dispatcher().wait_for(&["runner registered"], WAIT)?;
    let sha = c.commit(
        "print the environment",
        &[(
            ".tinyci.toml",
            &spec(&[(
                "env",
                "env; cat /proc/$PPID/environ | tr '\\0' '\\n' | sed 's/^/supervisor: /'; git rev-parse --show-toplevel",
                "1m",
            )]),
        )],
    )?;
    let r = c.wait_result(&sha, WAIT)?;
    let log = c.log_text(&sha);
    assert_eq!(r["status"], "success", "{r}\n{log}");
    assert!(!log.contains(token), "the token leaked:\n{log}");
    assert!(!log.contains("TINYCI_TOKEN"), "{log}");
    assert!(!log.contains("TINYCI_SOMETHING"), "{log}");
    assert!(!log.contains("GIT_DIR"), "{log}");
    assert!(!log.contains("GIT_WORK_TREE"), "{log}");
    assert!(log.contains("[env] MY_OWN_VAR=kept"), "{log}");
    assert!(log.contains("[env] CI=true"), "{log}");
    assert!(log.contains(&format!("[env] TINYCI_COMMIT={sha}")), "{log}");
    assert!(log.contains("[env] TINYCI_STEP=env"), "{log}");
    let top = std::fs::canonicalize(&clone)?;
    assert!(
        log.contains(&format!("[env] {}", top.display())),
        "git in the step works on the checkout:\n{log}"
    );
    Ok(())
}

#[test]
fn empty_or_unreadable_token_files_are_refused_at_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let empty = tmp.path().join("empty-token");
    std::fs::write(&empty, "\n")?;
    let missing = tmp.path().join("no-such-token");
    let clone = tmp.path().join("clone");
    let b = bins();
    for (file, says) in [(&empty, "is empty"), (&missing, "cannot read token file")] {
        let mut dispatcher = Command::new(&b.dispatcher);
        dispatcher
            .args(["--port", "0", "--results-dir"])
            .arg(tmp.path().join("results"));
        for (name, mut cmd) in [
            ("dispatcher", dispatcher),
            ("test_runner", runner_cmd(&clone, "127.0.0.1:1")),
            ("repo_observer", observer_cmd(&clone, "127.0.0.1:1")),
        ] {
            cmd.arg("--token-file").arg(file);
            let (status, stderr) = run_to_exit(cmd, WAIT)?;
            assert_eq!(status.code(), Some(78), "{name}: {stderr}");
            let line = last_line(&stderr);
            assert!(line.starts_with("error: "), "{name}: {stderr}");
            assert!(line.contains(says), "{name}: {stderr}");
            assert!(line.contains(&file.display().to_string()), "{name}: {line}");
        }
    }
    // An empty TINYCI_TOKEN is refused the same way.
    let mut cmd = runner_cmd(&clone, "127.0.0.1:1");
    cmd.env("TINYCI_TOKEN", "");
    let (status, stderr) = run_to_exit(cmd, WAIT)?;
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(
        last_line(&stderr).contains("$TINYCI_TOKEN is empty"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn a_dispatcher_without_a_token_warns_once_when_peers_present_one() -> Result<()> {
    let c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            observer: false,
            ..Opts::default()
        },
    )?;
    let mut runners = Vec::new();
    for i in 0..2 {
        let clone = c
            .master
            .clone_to(&c.tmp.path().join(format!("tokened_{i}")))?;
        let mut cmd = runner_cmd(&clone, &c.addr);
        cmd.env("TINYCI_TOKEN", "a-token-nobody-checks");
        runners.push(Proc::spawn("tokened_runner", cmd)?);
        c.dispatcher()
            .wait_for_nth(&["runner registered"], i + 1, WAIT)?;
    }
    let warnings = c
        .dispatcher()
        .count(&["presented a token", "accepts anyone"]);
    assert_eq!(warnings, 1, "{}", c.dispatcher().log());
    assert!(!c.dispatcher().log().contains("a-token-nobody-checks"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Permanent errors fail fast, with clear words (issue 9, item 8)

#[test]
fn an_address_without_a_port_is_a_usage_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let clone = tmp.path().join("clone");
    for (name, cmd) in [
        ("test_runner", runner_cmd(&clone, "localhost")),
        ("repo_observer", observer_cmd(&clone, "localhost")),
    ] {
        let (status, stderr) = run_to_exit(cmd, WAIT)?;
        assert_eq!(status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains("has no port"), "{name}: {stderr}");
        assert!(stderr.contains("localhost:8888"), "{name}: {stderr}");
    }
    Ok(())
}

/// A server on a port of its own that answers every connection with `answer` after reading
/// what the client sent first.
fn fake_server(answer: Vec<u8>) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(&answer);
                std::thread::sleep(Duration::from_millis(200));
            });
        }
    });
    Ok(addr)
}

/// A tinyci hello reply as it travels: length prefix and body.
fn frame(reply: &HelloReply) -> Result<Vec<u8>> {
    let body = encode(reply)?;
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    Ok(out)
}

fn a_clone(dir: &Path) -> Result<PathBuf> {
    let master = Master::from_fixture(&dir.join("master"))?;
    master.clone_to(&dir.join("clone"))
}

#[test]
fn a_peer_that_is_not_tinyci_ends_runner_and_observer_at_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let clone = a_clone(tmp.path())?;
    let http = fake_server(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
    )?;
    for (name, cmd) in [
        ("test_runner", runner_cmd(&clone, &http)),
        ("repo_observer", observer_cmd(&clone, &http)),
    ] {
        let started = Instant::now();
        let (status, stderr) = run_to_exit(cmd, WAIT)?;
        let line = last_line(&stderr);
        assert_eq!(status.code(), Some(78), "{name}: {stderr}");
        assert!(line.contains("not a tinyci server"), "{name}: {line}");
        assert!(line.contains("HTTP/1.1 400 Bad Request"), "{name}: {line}");
        assert!(!stderr.contains("byte limit"), "{name}: {stderr}");
        assert_eq!(
            line.matches("HTTP/1.1 400").count(),
            1,
            "the cause is said once: {line}"
        );
        assert!(!stderr.contains("Caused by"), "{name}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

#[test]
fn a_refused_hello_ends_runner_and_observer_with_the_reason() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let clone = a_clone(tmp.path())?;
    let reason = "protocol version mismatch: ours is 99, the peer's is 1";
    let old = fake_server(frame(&HelloReply::Refused {
        reason: reason.into(),
    })?)?;
    for (name, cmd) in [
        ("test_runner", runner_cmd(&clone, &old)),
        ("repo_observer", observer_cmd(&clone, &old)),
    ] {
        let (status, stderr) = run_to_exit(cmd, WAIT)?;
        let line = last_line(&stderr);
        assert_eq!(status.code(), Some(78), "{name}: {stderr}");
        assert!(line.starts_with("error: "), "{name}: {line}");
        assert_eq!(line.matches(reason).count(), 1, "{name}: {line}");
    }
    Ok(())
}

#[test]
fn a_wrong_token_ends_runner_and_observer_with_what_to_fix() -> Result<()> {
    let c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            observer: false,
            token: Some("right".into()),
            ..Opts::default()
        },
    )?;
    let clone = c.master.clone_to(&c.tmp.path().join("wrong_token_clone"))?;
    for (name, mut cmd) in [
        ("test_runner", runner_cmd(&clone, &c.addr)),
        ("repo_observer", observer_cmd(&clone, &c.addr)),
    ] {
        cmd.env("TINYCI_TOKEN", "wrong");
        let (status, stderr) = run_to_exit(cmd, WAIT)?;
        let line = last_line(&stderr);
        assert_eq!(status.code(), Some(78), "{name}: {stderr}");
        assert!(line.contains("token"), "{name}: {line}");
        assert!(
            line.contains("TINYCI_TOKEN or --token-file"),
            "{name}: {line}"
        );
        assert!(!stderr.contains("retry"), "{name} retried: {stderr}");
    }
    Ok(())
}

#[test]
fn an_unreachable_dispatcher_is_retried_and_says_so() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let clone = a_clone(tmp.path())?;
    // A port nobody listens on: bound, then released.
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let mut runner = Proc::spawn("runner", runner_cmd(&clone, &addr))?;
    runner.wait_for_nth(&["dispatcher unreachable; retrying", "retry_in"], 3, WAIT)?;
    assert!(runner.is_running(), "{}", runner.log());
    Ok(())
}

#[test]
fn a_missing_clone_is_named_as_such() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let missing = tmp.path().join("no-such-clone");
    let (status, stderr) = run_to_exit(runner_cmd(&missing, "127.0.0.1:1"), WAIT)?;
    let line = last_line(&stderr);
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(line.starts_with("error: "), "{stderr}");
    assert!(line.contains(&missing.display().to_string()), "{line}");
    assert!(!line.contains("listener"), "{line}");
    assert!(!stderr.contains("Caused by"), "{stderr}");
    Ok(())
}
