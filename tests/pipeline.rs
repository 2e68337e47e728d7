//! End-to-end tests of the core pipeline: the real dispatcher, runners and observer against
//! temporary git repositories, one failure mode per test.

use std::time::Duration;

use anyhow::Result;
use testkit::*;

fn bins() -> Bins {
    testkit::bins!()
}

/// A spec whose only step sleeps (to keep a runner busy), then passes.
fn slow_spec(secs: &str) -> String {
    spec(&[(
        "slow",
        &format!("echo start; sleep {secs}; echo done"),
        "1m",
    )])
}

#[test]
fn one_commit_gives_a_success_result_and_a_log() -> Result<()> {
    let c = Cluster::start(bins(), Opts::default())?;
    let sha = c.master.head()?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["commit"], sha.as_str());
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        steps(&r),
        vec![
            ("check".into(), "success".into()),
            ("test".into(), "success".into())
        ]
    );
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["runner"], c.runner_addrs[0].as_str());
    assert!(r["error"].is_null());
    assert_eq!(r["steps"][1]["exit_code"], 0);
    for key in ["queued_at", "started_at", "finished_at"] {
        time_ms(&r, key)?;
    }
    let log = c.log_text(&sha);
    assert!(log.contains("[test] test_add"), "{log}");
    assert!(log.contains("OK"), "{log}");
    // The runner says how long its checkout took, and where the time went.
    let checkout = log
        .lines()
        .find(|l| l.starts_with("[tinyci] checked out "))
        .unwrap_or_else(|| panic!("no checkout note in {log}"));
    for phase in ["heal ", "fetch ", "sweep ", "checkout ", "objects "] {
        assert!(
            checkout.contains(phase),
            "{phase:?} missing in {checkout:?}"
        );
    }
    // The database lives in a dot-directory and is not a result.
    assert_eq!(c.result_files(), vec![sha]);
    Ok(())
}

#[test]
fn failing_commit_names_the_failing_step_and_skips_the_rest() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let sha = c.commit("break the syntax", &[("calc.py", "def add(a, b:\n")])?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "failure", "{r}");
    assert_eq!(
        steps(&r),
        vec![
            ("check".into(), "failure".into()),
            ("test".into(), "skipped".into())
        ]
    );
    assert_ne!(r["steps"][0]["exit_code"], 0);
    assert!(r["steps"][1]["exit_code"].is_null());
    assert!(c.log_text(&sha).contains("[check]"), "{}", c.log_text(&sha));

    // A failing test (not the check) fails the last step.
    let sha = c.commit(
        "wrong arithmetic",
        &[(
            "calc.py",
            "def add(a, b):\n    return a - b\n\ndef mean(v):\n    return sum(v) / len(v)\n",
        )],
    )?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "failure");
    assert_eq!(r["steps"][1]["status"], "failure");
    assert!(c.log_text(&sha).contains("[test] FAIL: test_add"));
    Ok(())
}

#[test]
fn five_commits_in_one_poll_interval_give_five_results() -> Result<()> {
    let c = Cluster::start(
        bins(),
        Opts {
            poll_interval: "3s",
            ..Opts::default()
        },
    )?;
    let obs = c.observer.as_ref().unwrap();
    // Right after a poll submitted the tip, the next poll is ~3 s away.
    obs.wait_for(&["submitted"], WAIT)?;
    let mut shas = Vec::new();
    for i in 0..5 {
        shas.push(c.commit(&format!("commit {i}"), &[("n.txt", &i.to_string())])?);
    }
    for sha in &shas {
        let r = c.wait_result(sha, WAIT)?;
        assert_eq!(r["status"], "success", "{r}");
    }
    // All five came in one submission, oldest first, each queued exactly once.
    obs.wait_for(
        &["submitted", "commits=5", &format!("last={}", shas[4])],
        WAIT,
    )?;
    let d = c.dispatcher();
    let mut queued_at = Vec::new();
    for sha in &shas {
        assert_eq!(d.count(&["queued", &format!("commit={sha}")]), 1);
        queued_at.push(time_ms(&c.wait_result(sha, WAIT)?, "started_at")?);
    }
    assert!(
        queued_at.windows(2).all(|w| w[0] <= w[1]),
        "run in commit order"
    );
    assert_eq!(c.result_files().len(), 6);
    Ok(())
}

#[test]
fn two_runners_share_the_work() -> Result<()> {
    let c = Cluster::start_ready(
        bins(),
        Opts {
            runners: 2,
            ..Opts::default()
        },
    )?;
    let mut shas = Vec::new();
    for i in 0..4 {
        shas.push(c.commit(
            &format!("slow {i}"),
            &[(".tinyci.toml", &slow_spec(&format!("1.{i}")))],
        )?);
    }
    let mut runners = std::collections::HashSet::new();
    let (mut first_start, mut last_finish, mut busy) = (u128::MAX, 0u128, 0u128);
    for sha in &shas {
        let r = c.wait_result(sha, WAIT)?;
        assert_eq!(r["status"], "success", "{r}");
        runners.insert(r["runner"].as_str().unwrap_or("").to_owned());
        let (s, f) = (time_ms(&r, "started_at")?, time_ms(&r, "finished_at")?);
        first_start = first_start.min(s);
        last_finish = last_finish.max(f);
        busy += f - s;
    }
    assert_eq!(runners.len(), 2, "both runners used: {runners:?}");
    let wall = last_finish - first_start;
    // One runner would need `busy`; two working in parallel clearly less.
    assert!(
        wall * 4 < busy * 3,
        "wall {wall} ms is not clearly below one runner's {busy} ms"
    );
    Ok(())
}

#[test]
fn killed_runner_job_reruns_on_another_runner() -> Result<()> {
    let mut c = Cluster::start_ready(
        bins(),
        Opts {
            runners: 2,
            ..Opts::default()
        },
    )?;
    let sha = c.commit("slow", &[(".tinyci.toml", &slow_spec("2"))])?;
    let (i, victim) = c.wait_assigned(&sha)?;
    c.runners[i].kill();
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 2);
    assert_ne!(r["runner"], victim.as_str());
    assert!(c.dispatcher().log().contains("runner lost mid-job"));
    assert_eq!(
        c.dispatcher()
            .count(&["result recorded", &format!("commit={sha}")]),
        1
    );
    let log = c.log_text(&sha);
    assert!(
        log.contains("attempt 1 on runner") && log.contains("attempt 2 on runner"),
        "{log}"
    );
    Ok(())
}

#[test]
fn step_timeout_kills_the_whole_process_group() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let toml = spec(&[
        // A background child and a grandchild that would outlive a plain kill of sh.
        (
            "hang",
            "sleep 300 & (sleep 301 &) ; echo waiting; sleep 302",
            "1s",
        ),
        ("after", "echo never", "10s"),
    ]);
    let sha = c.commit("hangs", &[(".tinyci.toml", &toml)])?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "failure", "{r}");
    assert_eq!(
        steps(&r),
        vec![
            ("hang".into(), "timeout".into()),
            ("after".into(), "skipped".into())
        ]
    );
    assert!(r["steps"][0]["duration_ms"].as_u64().unwrap() >= 1000);
    let log = c.log_text(&sha);
    assert!(log.contains("[hang] waiting"), "{log}");
    assert!(log.contains("timed out"), "{log}");
    wait_until(
        "the step's processes to be gone",
        Duration::from_secs(10),
        || step_processes(&sha).is_empty(),
    )?;
    Ok(())
}

#[test]
fn observer_started_before_the_dispatcher_delivers_later() -> Result<()> {
    // Learn a free port, then leave it free for the dispatcher we start later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            observer: false,
            ..Opts::default()
        },
    )?;
    c.dispatcher.take(); // the cluster's own dispatcher is not used
    c.addr = format!("127.0.0.1:{port}");
    c.start_observer()?;
    let obs = c.observer.as_ref().unwrap();
    obs.wait_for(&["dispatcher unreachable"], WAIT)?;
    let tip = c.master.head()?;
    let a = c.commit("while down 1", &[("a.txt", "1")])?;
    let b = c.commit("while down 2", &[("b.txt", "2")])?;
    obs.wait_for_nth(&["dispatcher unreachable"], 2, WAIT)?;
    assert!(c.result_files().is_empty());

    c.start_dispatcher(&port.to_string())?;
    c.add_runner()?;
    for sha in [&tip, &a, &b] {
        assert_eq!(c.wait_result(sha, WAIT)?["status"], "success");
    }
    Ok(())
}

/// Asks a runner's own port what it is doing.
fn runner_status(addr: &str) -> Result<(bool, Option<String>)> {
    use tinyci::proto::{FromRunner, Role, ToRunner};
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut conn = tinyci::net::connect(addr, Role::Client, "").await?;
        conn.send(&ToRunner::Status).await?;
        let FromRunner::Status {
            addr: reported,
            connected,
            commit,
            ..
        } = conn.recv_within(WAIT, "the status").await?;
        anyhow::ensure!(reported == addr, "runner says it is {reported}, not {addr}");
        Ok((connected, commit.map(|c| c.to_string())))
    })
}

#[test]
fn runner_port_answers_status_queries() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let addr = &c.runner_addrs[0];
    wait_until("the runner to be idle", WAIT, || {
        runner_status(addr).is_ok_and(|s| s == (true, None))
    })?;
    let sha = c.commit("slow", &[(".tinyci.toml", &slow_spec("2"))])?;
    c.wait_assigned(&sha)?;
    wait_until("the runner to report its job", WAIT, || {
        runner_status(addr).is_ok_and(|s| s == (true, Some(sha.clone())))
    })?;
    c.wait_result(&sha, WAIT)?;
    wait_until("the runner to be idle again", WAIT, || {
        runner_status(addr).is_ok_and(|s| s == (true, None))
    })?;
    Ok(())
}

/// Whether the peer closes `s` (EOF or reset) within `within`, reading whatever it sends.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn runner_status_port_caps_connections_and_closes_silent_ones() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let addr = c.runner_addrs[0].clone();
    // Fill the cap (64) with connections that never say hello.
    let silent: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&addr))
        .collect::<Result<_, _>>()?;
    // Once all are accepted, one more is closed at once.
    wait_until(
        "a connection past the cap to be closed at once",
        WAIT,
        || {
            std::net::TcpStream::connect(&addr)
                .is_ok_and(|mut s| closed_within(&mut s, Duration::from_millis(500)))
        },
    )?;
    anyhow::ensure!(
        runner_status(&addr).is_err(),
        "a status query past the cap must be refused"
    );
    // The silent ones are closed by the runner at its handshake deadline (5 s)...
    let started = std::time::Instant::now();
    for mut s in silent {
        anyhow::ensure!(
            closed_within(&mut s, Duration::from_secs(15)),
            "a silent status connection was held open"
        );
    }
    anyhow::ensure!(started.elapsed() < Duration::from_secs(12));
    // ...and the port answers again.
    wait_until("the runner to answer status again", WAIT, || {
        runner_status(&addr).is_ok()
    })?;
    Ok(())
}
