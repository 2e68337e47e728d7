//! What the HTTP tests (and the HTTP benchmark) share: a cluster whose dispatcher also
//! serves HTTP, a blocking HTTP client, and a reader of Server-Sent Events.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use testkit::*;

/// A cluster whose dispatcher serves HTTP too, at `base` (`http://127.0.0.1:PORT`).
pub struct Web {
    pub c: Cluster,
    pub base: String,
    pub http: reqwest::blocking::Client,
}

/// Starts a cluster as `opts` says, its dispatcher with `--http 127.0.0.1:0` and `extra`
/// arguments; runners and the observer join once it serves.
pub fn start(bins: Bins, opts: Opts, extra: &[&str]) -> Result<Web> {
    let mut c = Cluster::start(
        bins,
        Opts {
            runners: 0,
            observer: false,
            ..opts.clone()
        },
    )?;
    // The harness starts a dispatcher without HTTP: replace it (nothing is connected yet).
    if let Some(mut old) = c.dispatcher.take() {
        old.kill();
        c.past_dispatchers.push(old);
    }
    let mut cmd = Command::new(&c.bins.dispatcher);
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--results-dir"])
        .arg(&c.results)
        .args([
            "--heartbeat-interval",
            opts.heartbeat_interval,
            "--heartbeat-timeout",
            opts.heartbeat_timeout,
            "--max-attempts",
            &opts.max_attempts.to_string(),
            "--http",
            "127.0.0.1:0",
        ])
        .args(extra);
    match &opts.token {
        Some(t) => cmd.env("TINYCI_TOKEN", t),
        None => cmd.env_remove("TINYCI_TOKEN"),
    };
    let p = Proc::spawn("dispatcher", cmd)?;
    let line = p.wait_for(&["listening", "results="], WAIT)?;
    c.addr = field(&line, "addr").ok_or_else(|| anyhow!("no addr in {line:?}"))?;
    let line = p.wait_for(&["http listening", "addr="], WAIT)?;
    let base = format!(
        "http://{}",
        field(&line, "addr").ok_or_else(|| anyhow!("no addr in {line:?}"))?
    );
    c.dispatcher = Some(p);
    for _ in 0..opts.runners {
        c.add_runner()?;
    }
    if opts.observer {
        c.start_observer()?;
    }
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    Ok(Web { c, base, http })
}

/// A cluster serving HTTP with the default options and no observer: the test submits
/// its commits over HTTP.
pub fn serving(bins: Bins) -> Result<Web> {
    start(
        bins,
        Opts {
            observer: false,
            ..Opts::default()
        },
        &[],
    )
}

impl Web {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path` as JSON: (status, body).
    pub fn get_json(&self, path: &str) -> Result<(u16, Value)> {
        let r = self
            .http
            .get(self.url(path))
            .header("accept", "application/json")
            .send()
            .with_context(|| format!("GET {path}"))?;
        let status = r.status().as_u16();
        let text = r.text()?;
        let v = serde_json::from_str(&text).with_context(|| format!("GET {path}: {text}"))?;
        Ok((status, v))
    }

    /// Polls `GET /run/{sha}` until its status is `status`.
    pub fn wait_status(&self, sha: &str, status: &str) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let (code, v) = self.get_json(&format!("/run/{sha}"))?;
            if code == 200 && v["status"] == status {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("{sha} never got to {status}; last: {code} {v}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Submits `sha` over HTTP (with the cluster's token).
    pub fn submit(&self, sha: &str) -> Result<Value> {
        let mut req = self.http.post(self.url(&format!("/run/{sha}")));
        if let Some(t) = &self.c.opts.token {
            req = req.bearer_auth(t);
        }
        let r = req.send()?;
        if r.status().as_u16() != 202 {
            bail!("submit {sha}: {} {}", r.status(), r.text()?);
        }
        Ok(r.json()?)
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl Sse {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.data).with_context(|| self.data.clone())
    }
}

/// Reads Server-Sent Events from a response body.
pub struct SseReader<R> {
    lines: BufReader<R>,
}

impl<R: Read> SseReader<R> {
    pub fn new(body: R) -> Self {
        SseReader {
            lines: BufReader::new(body),
        }
    }

    /// The next event; `None` at the end of the stream.
    pub fn next_event(&mut self) -> Result<Option<Sse>> {
        let mut ev = Sse {
            event: "message".into(),
            id: None,
            data: String::new(),
        };
        let mut any = false;
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if any {
                    return Ok(Some(ev));
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // keep-alive comment
            }
            let (k, v) = line.split_once(':').unwrap_or((line, ""));
            let v = v.strip_prefix(' ').unwrap_or(v);
            any = true;
            match k {
                "event" => ev.event = v.to_owned(),
                "id" => ev.id = Some(v.to_owned()),
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(v);
                }
                _ => {}
            }
        }
    }
}

/// A step that prints `n` numbered lines (in colour), one every `gap` seconds.
pub fn slow_lines_step(n: u32, gap: &str) -> String {
    spec(&[(
        "lines",
        &format!(
            "for i in $(seq 1 {n}); do printf '\\033[32mline %s\\033[0m ok <i>&</i>\\n' $i; sleep {gap}; done"
        ),
        "60s",
    )])
}
