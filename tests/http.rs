//! The HTTP API against the real binaries: shapes and status codes of every endpoint, the
//! token on POSTs, byte ranges of the raw log, hostile paths, metrics, badge and OpenAPI;
//! Server-Sent Events resumed with `Last-Event-ID` without a line twice, and a followed
//! raw log that ends with the run.

mod http_common;

use anyhow::{ensure, Context, Result};
use http_common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;
use testkit::*;

const TOKEN: &str = "s3cret-token";

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn api_answers_with_documented_shapes_codes_token_and_ranges() -> Result<()> {
    let w = start(
        testkit::bins!(),
        Opts {
            observer: false,
            token: Some(TOKEN.into()),
            ..Opts::default()
        },
        &[],
    )?;
    // A log with HTML and ANSI colours in it: the page must escape one and render the other.
    let sha = w.c.commit(
        "colours",
        &[(
            ".tinyci.toml",
            &spec(&[(
                "greet",
                r"printf 'hello <b>bold</b> & \033[31mred\033[0m\n'; echo second line",
                "30s",
            )]),
        )],
    )?;

    // POSTs need the token; a wrong one is refused just like none.
    let post = |path: &str, token: Option<&str>| -> Result<(u16, Value)> {
        let mut req = w.http.post(w.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send()?;
        let code = r.status().as_u16();
        let www = r.headers().get("www-authenticate").cloned();
        let v: Value = r.json()?;
        if code == 401 {
            assert_eq!(www.as_ref().and_then(|h| h.to_str().ok()), Some("Bearer"));
        }
        Ok((code, v))
    };
    let (code, v) = post(&format!("/run/{sha}"), None)?;
    assert_eq!(code, 401, "{v}");
    assert!(v["error"].is_string());
    assert_eq!(post(&format!("/run/{sha}"), Some("wrong"))?.0, 401);
    assert_eq!(post(&format!("/run/{sha}/cancel"), None)?.0, 401);
    let (code, v) = post(&format!("/run/{sha}"), Some(TOKEN))?;
    assert_eq!((code, v["queued"].as_u64()), (202, Some(1)), "{v}");

    let run = w.wait_status(&sha, "success")?;
    assert_eq!(
        keys(&run),
        [
            "id",
            "status",
            "branch",
            "failed_steps",
            "queued_at",
            "finished_at",
            "attempts",
            "steps",
            "runner",
            "started_at",
            "error",
            "log_bytes",
            "attempt_history"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
    assert_eq!(run["steps"][0]["name"], "greet");
    assert_eq!(run["steps"][0]["status"], "success");
    assert_eq!(run["attempt_history"].as_array().map(Vec::len), Some(1));

    // The list, seed 002's shape.
    let (code, runs) = w.get_json("/runs?limit=10")?;
    assert_eq!(code, 200);
    assert_eq!(runs["total"], 1);
    assert_eq!(
        keys(&runs["data"][0]),
        [
            "id",
            "status",
            "branch",
            "failed_steps",
            "queued_at",
            "finished_at",
            "attempts"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
    assert_eq!(runs["data"][0]["id"], sha.as_str());
    assert_eq!(w.get_json("/runs?status=success")?.1["total"], 1);
    assert_eq!(w.get_json("/runs?status=failure")?.1["total"], 0);
    assert_eq!(w.get_json("/runs?status=bogus")?.0, 400);
    assert_eq!(w.get_json("/runs?limit=abc")?.0, 400);

    // A unique prefix finds the run; unknown and hostile ones are 404s with a JSON error.
    let (code, v) = w.get_json(&format!("/run/{}", &sha[..8]))?;
    assert_eq!((code, v["id"].as_str()), (200, Some(sha.as_str())));
    for path in [
        "/run/0000dead",
        "/run/..%2F..%2F..%2Fetc%2Fpasswd",
        "/run/%00%01",
        "/run/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "/run/..%2F..%2Fetc%2Fpasswd/log",
        "/run/0000dead/log",
        "/events?run=..%2Fetc",
        "/events?run=eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    ] {
        let (code, v) = w.get_json(path)?;
        assert_eq!(code, 404, "{path}: {v}");
        assert!(v["error"].is_string(), "{path}: {v}");
    }
    let long = format!("/run/{}", "a".repeat(20_000));
    let r = w.http.get(w.url(&long)).send()?;
    assert!(r.status().is_client_error(), "{}", r.status());
    let (code, _) = post("/run/..%2F..%2Fetc", Some(TOKEN))?;
    assert_eq!(code, 400);

    // The raw log, whole and in ranges.
    let full = w.http.get(w.url(&format!("/run/{sha}/log"))).send()?;
    assert_eq!(full.status().as_u16(), 200);
    let full = full.bytes()?.to_vec();
    assert_eq!(full, std::fs::read(w.c.results.join(format!("{sha}.log")))?);
    assert!(full.len() > 10);
    let len = full.len();
    let ranged = |spec: &str| {
        w.http
            .get(w.url(&format!("/run/{sha}/log")))
            .header("range", spec)
            .send()
    };
    let r = ranged("bytes=3-")?;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str()?,
        format!("bytes 3-{}/{len}", len - 1)
    );
    assert_eq!(r.bytes()?.to_vec(), full[3..]);
    let r = ranged("bytes=2-5")?;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.bytes()?.to_vec(), full[2..6]);
    for huge in [
        format!("bytes={len}-"),
        "bytes=18446744073709551615-".into(),
        "bytes=99999999999999999999999999999-".into(),
    ] {
        let r = ranged(&huge)?;
        assert_eq!(r.status().as_u16(), 416, "{huge}");
        assert_eq!(
            r.headers()["content-range"].to_str()?,
            format!("bytes */{len}")
        );
    }

    // The run's page escapes the log, renders its colours and numbers its lines.
    let page = w
        .http
        .get(w.url(&format!("/run/{sha}")))
        .header("accept", "text/html")
        .send()?
        .text()?;
    assert!(
        page.contains("hello &lt;b&gt;bold&lt;/b&gt; &amp;"),
        "{page}"
    );
    assert!(!page.contains("<b>bold</b>"), "{page}");
    assert!(page.contains("color:var(--red"), "{page}");
    assert!(page.contains(r##"id="L2""##) && page.contains(r##"href="#L2""##));
    let missing = w
        .http
        .get(w.url("/run/%3Cscript%3Ealert(1)%3C%2Fscript%3E"))
        .header("accept", "text/html")
        .send()?;
    assert_eq!(missing.status().as_u16(), 404);
    let missing = missing.text()?;
    assert!(
        missing.contains("&lt;script&gt;") && !missing.contains("<script>alert"),
        "{missing}"
    );
    let index = w.http.get(w.url("/")).send()?.text()?;
    assert!(index.contains(&format!("run-{sha}")), "{index}");

    let badge = w.http.get(w.url("/badge.svg")).send()?;
    assert_eq!(badge.headers()["content-type"], "image/svg+xml");
    assert!(badge.text()?.contains("passing"));
    let badge = w.http.get(w.url("/badge.svg?branch=nope")).send()?.text()?;
    assert!(badge.contains("unknown"));

    let metrics = w.http.get(w.url("/metrics")).send()?.text()?;
    for needle in [
        "tinyci_queue_length 0",
        "tinyci_runners{state=\"idle\"} 1",
        "tinyci_runs{status=\"success\"} 1",
        "tinyci_attempts_started_total 1",
        "tinyci_attempts_ended_total{outcome=\"reported\"} 1",
        "tinyci_run_duration_seconds_count 1",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }

    // Two commits that share a prefix (made up: nothing needs to check them out) make
    // the prefix ambiguous; cancelling them needs the token too.
    let (a, b) = (
        "abcd".to_owned() + &"0".repeat(36),
        "abcd".to_owned() + &"1".repeat(36),
    );
    assert_eq!(post(&format!("/run/{a}?front=true"), Some(TOKEN))?.0, 202);
    assert_eq!(post(&format!("/run/{b}"), Some(TOKEN))?.0, 202);
    let (code, v) = w.get_json("/run/abcd")?;
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["candidates"].as_array().map(Vec::len), Some(2), "{v}");
    let (code, v) = post(&format!("/run/{b}/cancel"), Some(TOKEN))?;
    assert_eq!(code, 200, "{v}");
    assert!(
        ["queued", "running", "error", "cancelled"].contains(&v["was"].as_str().unwrap_or("")),
        "{v}"
    );
    let (code, _) = post(&format!("/run/{}/cancel", "e".repeat(40)), Some(TOKEN))?;
    assert_eq!(code, 404);

    let (code, q) = w.get_json("/queue")?;
    assert_eq!(code, 200);
    for item in q.as_array().context("queue is an array")? {
        assert_eq!(
            keys(item),
            ["id", "branch", "queued_at", "attempts", "waiting"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
    }
    let (code, runners) = w.get_json("/runners")?;
    assert_eq!(code, 200);
    assert_eq!(runners.as_array().map(Vec::len), Some(1));
    assert_eq!(
        keys(&runners[0]),
        ["id", "addr", "state", "commit", "reason"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );

    let (code, doc) = w.get_json("/openapi.json")?;
    assert_eq!(code, 200);
    for path in [
        "/runs",
        "/run/{sha}",
        "/run/{sha}/log",
        "/run/{sha}/cancel",
        "/queue",
        "/runners",
        "/events",
        "/metrics",
        "/badge.svg",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let docs = w.http.get(w.url("/docs/")).send()?;
    assert_eq!(docs.status().as_u16(), 200);
    assert!(docs.text()?.to_lowercase().contains("swagger"));

    // A runner that dies is an infrastructure failure, counted by reason.
    let mut w = w;
    w.c.runners[0].kill();
    let needle = "tinyci_infrastructure_failures_total{reason=\"runner_lost\"} 1";
    wait_until("the lost runner counted", WAIT, || {
        w.http
            .get(w.url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .is_ok_and(|m| m.contains(needle) && m.contains("tinyci_runners{state=\"idle\"} 0"))
    })?;
    Ok(())
}

/// Reads events until `stop` says so (or the stream ends); bounded by the client timeout.
fn read_events<R: std::io::Read>(
    r: &mut SseReader<R>,
    mut stop: impl FnMut(&Sse) -> bool,
) -> Result<Vec<Sse>> {
    let mut out = Vec::new();
    while let Some(ev) = r.next_event()? {
        let done = stop(&ev);
        out.push(ev);
        if done {
            break;
        }
    }
    Ok(out)
}

fn log_lines(evs: &[Sse]) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for e in evs.iter().filter(|e| e.event == "log") {
        for l in e.json()?["lines"].as_array().context("lines")? {
            lines.push(l.as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(lines)
}

#[test]
fn events_resume_after_the_last_offset_without_a_line_twice() -> Result<()> {
    let w = serving(testkit::bins!())?;
    let sha =
        w.c.commit("slow", &[(".tinyci.toml", &slow_lines_step(30, "0.1"))])?;

    // The live stream (the page's) and a followed raw log, both opened before the run.
    let base = w.base.clone();
    let live_sha = sha.clone();
    let live = std::thread::spawn(move || -> Result<Vec<String>> {
        let resp = reqwest::blocking::Client::new()
            .get(format!("{base}/events"))
            .timeout(WAIT)
            .send()?;
        let mut r = SseReader::new(resp);
        let mut seen = Vec::new();
        read_events(&mut r, |e| {
            let v = e.json().unwrap_or_default();
            if e.event == "run" && v["id"] == live_sha.as_str() {
                seen.push(v["status"].as_str().unwrap_or_default().to_owned());
            }
            seen.last().is_some_and(|s| s == "success")
        })?;
        Ok(seen)
    });
    let w_submit = w.submit(&sha)?;
    assert_eq!(w_submit["queued"], 1);
    let base = w.base.clone();
    let follow_sha = sha.clone();
    let followed = std::thread::spawn(move || -> Result<Vec<u8>> {
        let resp = reqwest::blocking::Client::new()
            .get(format!("{base}/run/{follow_sha}/log?follow=1"))
            .timeout(WAIT)
            .send()?;
        Ok(resp.bytes()?.to_vec())
    });

    // First connection: a few log events, then gone.
    let resp = w
        .http
        .get(w.url(&format!("/events?run={sha}")))
        .timeout(WAIT)
        .send()?;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut r = SseReader::new(resp);
    let mut logs = 0;
    let first = read_events(&mut r, |e| {
        if e.event == "log" {
            logs += 1;
        }
        logs == 3
    })?;
    drop(r);
    let last_id = first
        .iter()
        .rev()
        .find_map(|e| e.id.clone())
        .context("no event with an id")?;
    // Every id is the log offset just past the lines of its event.
    let mut expect = 0u64;
    for e in first.iter().filter(|e| e.event == "log") {
        let v = e.json()?;
        assert_eq!(v["offset"].as_u64(), Some(expect), "{e:?}");
        let bytes: usize = v["lines"]
            .as_array()
            .context("lines")?
            .iter()
            .map(|l| l.as_str().unwrap_or_default().len() + 1)
            .sum();
        expect += bytes as u64;
        assert_eq!(e.id.as_deref(), Some(expect.to_string().as_str()));
    }

    // Second connection resumes after the last id, to the end.
    let resp = w
        .http
        .get(w.url(&format!("/events?run={sha}")))
        .header("last-event-id", &last_id)
        .timeout(WAIT)
        .send()?;
    let mut r = SseReader::new(resp);
    let rest = read_events(&mut r, |e| e.event == "end")?;
    let end = rest.last().context("no events after resuming")?;
    assert_eq!(end.event, "end", "{rest:?}");
    assert_eq!(end.json()?["status"], "success");
    // The stream closes after `end`.
    assert!(r.next_event()?.is_none());

    let log = std::fs::read_to_string(w.c.results.join(format!("{sha}.log")))?;
    let mut got = log_lines(&first)?;
    got.extend(log_lines(&rest)?);
    let want: Vec<String> = log.lines().map(str::to_owned).collect();
    assert_eq!(got, want, "the two connections together are the log, once");
    assert_eq!(want.iter().filter(|l| l.contains("line ")).count(), 30);

    let followed = followed.join().expect("follow thread")?;
    assert_eq!(String::from_utf8_lossy(&followed), log);
    let seen = live.join().expect("live thread")?;
    assert_eq!(seen.last().map(String::as_str), Some("success"), "{seen:?}");

    // A resume past the end of a finished run's log is just the end.
    let resp = w
        .http
        .get(w.url(&format!("/events?run={sha}")))
        .header("last-event-id", "99999999999")
        .timeout(WAIT)
        .send()?;
    let evs = read_events(&mut SseReader::new(resp), |e| e.event == "end")?;
    assert!(log_lines(&evs)?.is_empty(), "{evs:?}");
    Ok(())
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("no ')' in stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from 1 with the pid; `rest` starts at 3.
    let ticks: u64 = fields[14 - 3].parse::<u64>()? + fields[15 - 3].parse::<u64>()?;
    // SAFETY: sysconf(3) with a valid name reads a constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Ok(Duration::from_millis(ticks * 1000 / hz.max(1)))
}

/// Followers of a running commit that prints nothing (raw log with `?follow=1`, and
/// `/events`) cost an idle dispatcher next to nothing: each waits for a change, and a
/// follower's own questions to the core change nothing (were they to wake the followers,
/// the followers would ask again, round and round, a core busy forever).
#[test]
fn followers_of_a_silent_run_leave_the_dispatcher_idle() -> Result<()> {
    let w = serving(testkit::bins!())?;
    let sha = w.c.commit(
        "quiet",
        &[(
            ".tinyci.toml",
            &spec(&[("quiet", "echo started; sleep 12", "60s")]),
        )],
    )?;
    w.submit(&sha)?;
    w.wait_status(&sha, "running")?;
    // The step is asleep once its one line is in the log.
    wait_until("the step to print its line", WAIT, || {
        w.http
            .get(w.url(&format!("/run/{sha}/log")))
            .send()
            .and_then(|r| r.text())
            .is_ok_and(|t| t.contains("started"))
    })?;
    // Each follower says when its answer (200) has brought its first bytes, then reads on
    // until the run ends (or the test drops it).
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let mut paths = Vec::new();
    for _ in 0..3 {
        paths.push(format!("/run/{sha}/log?follow=1"));
        paths.push(format!("/events?run={sha}"));
    }
    let mut followers = Vec::new();
    for path in &paths {
        let url = w.url(path);
        let ready_tx = ready_tx.clone();
        followers.push(std::thread::spawn(move || -> Result<()> {
            let mut resp = reqwest::blocking::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(60))
                .send()?;
            ensure!(resp.status() == 200, "{url}: {}", resp.status());
            let mut buf = [0u8; 4096];
            let mut said = false;
            loop {
                let n = std::io::Read::read(&mut resp, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                if !said {
                    said = true;
                    let _ = ready_tx.send(());
                }
            }
        }));
    }
    for _ in &paths {
        ready
            .recv_timeout(WAIT)
            .context("a follower got nothing from the running commit")?;
    }
    // Measure the dispatcher's CPU while they follow.
    let pid = w.c.dispatcher().pid();
    let before = cpu_time(pid)?;
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    let used = cpu_time(pid)? - before;
    ensure!(
        w.get_json(&format!("/run/{sha}"))?.1["status"] == "running",
        "the run ended inside the window: the measurement is not of an idle dispatcher"
    );
    ensure!(
        followers.iter().all(|f| !f.is_finished()),
        "a follower stopped following inside the window"
    );
    ensure!(
        used < window / 7,
        "an idle dispatcher with {} followers used {used:?} of CPU in {window:?}",
        paths.len()
    );
    eprintln!(
        "dispatcher CPU with {} followers, idle: {used:?} in {window:?}",
        paths.len()
    );
    Ok(())
}
