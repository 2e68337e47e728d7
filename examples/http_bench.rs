//! The HTTP server's benchmark: requests per second for `GET /runs?limit=50` (newest,
//! filtered by status, deep in the history) and `GET /metrics` with a long history, the
//! time `tinyci status` takes there, and the time from a result reaching the dispatcher to
//! its Server-Sent Event reaching a client.
//!
//! Run with `cargo build --release --bins --examples && cargo run --release --example
//! http_bench -- [--runs N] [--seconds S] [--events N] [--schema-v2]` (defaults: 100000
//! runs, 5 s, 100 events; `--schema-v2` takes the database back to schema version 2 after
//! filling it, to measure binaries of a dispatcher from before version 3 placed beside
//! this one). The history is written straight into a fresh results directory's database (as
//! imported runs), then the real dispatcher serves it; a simulated runner speaking the real
//! protocol finishes each submitted commit at once. It is a benchmark, not a test: it
//! prints figures and asserts nothing about time.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use testkit::*;
use tinyci::dispatcher::state::Finished;
use tinyci::dispatcher::store::sqlite::SqliteStore;
use tinyci::dispatcher::store::{Op, Store};
use tinyci::proto::{
    CommitId, Connection, FromDispatcher, Role, RunReport, RunStatus, StepReport, StepStatus,
    ToDispatcher,
};

struct Args {
    runs: usize,
    seconds: u64,
    events: usize,
    clients: usize,
    schema_v2: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        runs: 100_000,
        seconds: 5,
        events: 100,
        clients: 4,
        schema_v2: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("a flag without its value");
        match flag.as_str() {
            "--runs" => a.runs = value()?.parse()?,
            "--seconds" => a.seconds = value()?.parse()?,
            "--events" => a.events = value()?.parse()?,
            "--clients" => a.clients = value()?.parse()?,
            "--schema-v2" => a.schema_v2 = true,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn sha(i: usize) -> CommitId {
    CommitId::parse(&format!("{i:040x}")).expect("40 hex digits")
}

/// Writes `n` finished runs into a fresh database in `dir`.
fn fill_history(dir: &std::path::Path, n: usize, schema_v2: bool) -> Result<()> {
    tinyci::results::prepare_dir(dir)?;
    let mut store = SqliteStore::open(dir)?;
    let start = SystemTime::now() - Duration::from_secs(n as u64 * 60);
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut commits = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let queued = start + Duration::from_secs(i as u64 * 60);
            let failed = i % 7 == 0;
            let run = Finished {
                commit: sha(i + 1),
                status: if failed {
                    RunStatus::Failure
                } else {
                    RunStatus::Success
                },
                steps: vec![StepReport {
                    name: "test".into(),
                    status: if failed {
                        StepStatus::Failure
                    } else {
                        StepStatus::Success
                    },
                    exit_code: Some(i32::from(failed)),
                    duration_ms: 1200,
                }],
                runner: Some("127.0.0.1:9000".into()),
                attempts: 1,
                queued_at: queued,
                started_at: Some(queued + Duration::from_secs(1)),
                finished_at: queued + Duration::from_secs(3),
                error: None,
            };
            commits.push(run.commit.clone());
            store.stage(Op::Imported { run });
        }
        store.stage(Op::FilesDurable { commits });
        store.commit()?;
    }
    if schema_v2 {
        store
            .connection()
            .execute_batch("DROP TABLE run_counts; PRAGMA user_version = 2;")?;
    }
    Ok(())
}

/// A runner that finishes every job at once, noting when it sent each result.
async fn sim_runner(addr: String, sent: Arc<Mutex<HashMap<String, Instant>>>) -> Result<()> {
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let mut conn = Connection::new(stream);
    conn.client_handshake(Role::Runner, "").await?;
    conn.send(&ToDispatcher::Register {
        addr: "127.0.0.1:9001".into(),
        held: None,
        paused: None,
    })
    .await?;
    loop {
        match conn.recv::<FromDispatcher>().await? {
            None => return Ok(()),
            Some(FromDispatcher::Ping { seq }) => conn.send(&ToDispatcher::Pong { seq }).await?,
            Some(FromDispatcher::Assign { job, commit }) => {
                sent.lock()
                    .expect("lock")
                    .insert(commit.as_str().to_owned(), Instant::now());
                conn.send(&ToDispatcher::Done {
                    job,
                    report: RunReport {
                        status: RunStatus::Success,
                        steps: Vec::new(),
                        error: None,
                    },
                    log_len: 0,
                })
                .await?;
            }
            Some(_) => {}
        }
    }
}

/// Requests per second for `url` over `seconds`, `clients` at a time.
async fn rate(http: &reqwest::Client, url: &str, clients: usize, seconds: u64) -> Result<f64> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let http = http.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let r = http.get(&url).send().await?;
                if !r.status().is_success() {
                    bail!("GET {url}: {}", r.status());
                }
                r.bytes().await?;
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / seconds as f64)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let bins = Bins::beside_current_exe()?;
    let tmp = tempfile::Builder::new()
        .prefix("tinyci-http-bench-")
        .tempdir()?;
    let results = tmp.path().join("results");
    let t = Instant::now();
    fill_history(&results, a.runs, a.schema_v2)?;
    println!(
        "history: {} runs written in {:.1} s",
        a.runs,
        t.elapsed().as_secs_f64()
    );

    let mut cmd = Command::new(&bins.dispatcher);
    cmd.args([
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http",
        "127.0.0.1:0",
    ])
    .arg("--results-dir")
    .arg(&results)
    .env_remove("TINYCI_TOKEN");
    let p = Proc::spawn("dispatcher", cmd)?;
    let line = p.wait_for(&["listening", "results="], WAIT)?;
    let addr = field(&line, "addr").context("dispatcher address")?;
    let line = p.wait_for(&["http listening", "addr="], WAIT)?;
    let base = format!("http://{}", field(&line, "addr").context("http address")?);
    let http = reqwest::Client::new();

    // Requests per second for one page of the newest runs.
    let page: serde_json::Value = http
        .get(format!("{base}/runs?limit=50"))
        .send()
        .await?
        .json()
        .await?;
    if page["total"] != a.runs || page["data"].as_array().map(Vec::len) != Some(50) {
        bail!("unexpected first page: total {}", page["total"]);
    }
    for (path, what) in [
        ("/runs?limit=50", "GET /runs?limit=50"),
        (
            "/runs?limit=50&status=failure",
            "GET /runs?limit=50&status=failure",
        ),
        (
            "/runs?limit=50&offset=5000",
            "GET /runs?limit=50&offset=5000",
        ),
        (
            "/metrics",
            "GET /metrics (the status: counts of runs by state)",
        ),
    ] {
        let n = rate(&http, &format!("{base}{path}"), a.clients, a.seconds).await?;
        println!(
            "{what} with {} runs in history: {:.0} requests/s ({} clients, {} s)",
            a.runs, n, a.clients, a.seconds
        );
    }

    // `tinyci status`, the whole command (a process, a connection, the status), one at a
    // time.
    let mut took = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let out = Command::new(&bins.tinyci)
            .args(["--dispatcher-server", &addr, "status"])
            .env_remove("TINYCI_TOKEN")
            .output()?;
        if !out.status.success() {
            bail!(
                "tinyci status: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        took.push(t.elapsed());
    }
    took.sort();
    println!(
        "`tinyci status` with {} runs in history, 20 runs one after another: median {:.1} ms, max {:.1} ms",
        a.runs,
        percentile(&took, 0.5).as_secs_f64() * 1000.0,
        took.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );

    // Result → event latency: a simulated runner finishes each commit at once; the live
    // event stream says when its run turned `success`.
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let runner = tokio::spawn(sim_runner(addr, sent.clone()));
    let resp = http.get(format!("{base}/events")).send().await?;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut latencies = Vec::new();
    for i in 0..a.events {
        let commit = sha(a.runs + 10 + i);
        let r = http.post(format!("{base}/run/{commit}")).send().await?;
        if r.status().as_u16() != 202 {
            bail!("submit: {}", r.status());
        }
        let deadline = Instant::now() + WAIT;
        'wait: loop {
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                if event.contains("event: run")
                    && event.contains(commit.as_str())
                    && event.contains("\"status\":\"success\"")
                {
                    let at = Instant::now();
                    let from = sent.lock().expect("lock").get(commit.as_str()).copied();
                    if let Some(from) = from {
                        latencies.push(at.duration_since(from));
                    }
                    break 'wait;
                }
            }
            let chunk = tokio::time::timeout_at(deadline.into(), body.next())
                .await
                .context("no event in time")?
                .context("the event stream ended")??;
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    runner.abort();
    latencies.sort();
    println!(
        "result sent by the runner → its SSE event at the client, {} runs: median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.9).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    drop(p);
    Ok(())
}
