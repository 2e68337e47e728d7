//! Test harness shared by the integration tests, the demo and the benchmark: real
//! binaries in child processes that are killed on drop, fresh master repositories made
//! from `test_repo_fixture/`, and waits on the dispatcher's typed answers (or, for what
//! only a log says, on log lines) with a deadline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub mod origins;

/// The binaries cargo built for the integration test that expands this (their paths are
/// only known there).
#[macro_export]
macro_rules! bins {
    () => {
        $crate::Bins {
            dispatcher: env!("CARGO_BIN_EXE_dispatcher").into(),
            runner: env!("CARGO_BIN_EXE_test_runner").into(),
            observer: env!("CARGO_BIN_EXE_repo_observer").into(),
            tinyci: env!("CARGO_BIN_EXE_tinyci").into(),
        }
    };
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dispatcher: PathBuf,
    pub runner: PathBuf,
    pub observer: PathBuf,
    pub tinyci: PathBuf,
}

impl Bins {
    /// The binaries next to the running executable's directory (for examples, which live in
    /// `target/<profile>/examples/`).
    pub fn beside_current_exe() -> Result<Bins> {
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| anyhow!("cannot locate target dir from {}", exe.display()))?;
        let bins = Bins {
            dispatcher: dir.join("dispatcher"),
            runner: dir.join("test_runner"),
            observer: dir.join("repo_observer"),
            tinyci: dir.join("tinyci"),
        };
        for b in [&bins.dispatcher, &bins.runner, &bins.observer, &bins.tinyci] {
            if !b.exists() {
                bail!(
                    "{} is missing: build the binaries first (cargo build --release)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// The repository's `test_repo_fixture/`.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("test_repo_fixture")
}

/// A child process whose stderr is collected line by line; killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    eof: Arc<AtomicBool>,
}

impl Proc {
    /// Starts `cmd` with stderr captured (stdout discarded).
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env(
                "RUST_LOG",
                std::env::var("TINYCI_TEST_LOG").unwrap_or("info".into()),
            );
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = lines.clone();
        let echo = std::env::var_os("TINYCI_TEST_ECHO").is_some();
        let tag = name.to_owned();
        let eof = Arc::new(AtomicBool::new(false));
        let eof_seen = eof.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[{tag}] {line}");
                }
                let (m, cv) = &*sink;
                m.lock().unwrap().push(line);
                cv.notify_all();
            }
            eof_seen.store(true, Ordering::Release);
        });
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines,
            eof,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// How many lines so far contain every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.lines
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until `n` lines contain every one of `needles`; returns the n-th.
    pub fn wait_for_nth(&self, needles: &[&str], n: usize, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        let (m, cv) = &*self.lines;
        let mut lines = m.lock().unwrap();
        loop {
            let hits: Vec<&String> = lines
                .iter()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .collect();
            if hits.len() >= n {
                return Ok(hits[n - 1].clone());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{}: no line #{n} with {needles:?} within {within:?}; log:\n{}",
                    self.name,
                    lines.join("\n")
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Waits for a line containing every one of `needles`.
    pub fn wait_for(&self, needles: &[&str], within: Duration) -> Result<String> {
        self.wait_for_nth(needles, 1, within)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit status if it came.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the process to exit by itself; its status, or `None` if it is
    /// still running at the deadline.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // The reader thread may still be moving the last lines over.
                let _ = self.wait_for_eof(Duration::from_secs(2));
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the stderr reader saw end of file (every line is in [`Proc::log`]).
    fn wait_for_eof(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.eof.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly on some kernels' accounting.
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// Runs git with a fixed identity, failing with its stderr.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=tinyci test",
            "-c",
            "user.email=test@tinyci.invalid",
            "-c",
            "init.defaultBranch=master",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "__pycache__" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// A master repository made from the fixture.
pub struct Master {
    pub dir: PathBuf,
}

impl Master {
    /// `dir` gets the fixture's files and one commit.
    pub fn from_fixture(dir: &Path) -> Result<Master> {
        copy_dir(&fixture_dir(), dir)?;
        git(dir, &["init", "-q"])?;
        git(dir, &["add", "-A"])?;
        // The message names the directory, so two tests never share a commit id (the
        // cleanup sweep kills processes by commit id).
        let message = format!("initial commit from the fixture\n\n{}", dir.display());
        git(dir, &["commit", "-qm", &message])?;
        Ok(Master {
            dir: dir.to_owned(),
        })
    }

    pub fn head(&self) -> Result<String> {
        git(&self.dir, &["rev-parse", "HEAD"])
    }

    /// Writes `files` (path, content) and commits them; returns the new sha.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> Result<String> {
        for (path, body) in files {
            let p = self.dir.join(path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(p, body)?;
        }
        git(&self.dir, &["add", "-A"])?;
        git(&self.dir, &["commit", "-qm", message, "--allow-empty"])?;
        self.head()
    }

    /// Clones the master to `dest`.
    pub fn clone_to(&self, dest: &Path) -> Result<PathBuf> {
        let out = Command::new("git")
            .args(["clone", "-q"])
            .arg(&self.dir)
            .arg(dest)
            .output()?;
        if !out.status.success() {
            bail!("git clone: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(dest.to_owned())
    }
}

/// A `.tinyci.toml` with one step per (name, run, timeout).
pub fn spec(steps: &[(&str, &str, &str)]) -> String {
    let mut s = String::new();
    for (name, run, timeout) in steps {
        s.push_str(&format!(
            "[[steps]]\nname = {name:?}\nrun = {run:?}\ntimeout = {timeout:?}\n\n"
        ));
    }
    s
}

static NEXT_RANGE: AtomicU32 = AtomicU32::new(0);

/// A port range of our own for one runner (tests never bind fixed ports): 50 ports below the
/// ephemeral range, spread by process id and a counter. If another test holds a port of
/// it, the runner simply takes the next one.
pub fn runner_port_range() -> String {
    let n = NEXT_RANGE.fetch_add(1, Ordering::Relaxed);
    let slot = (std::process::id().wrapping_mul(7919).wrapping_add(n * 13)) % 240;
    let lo = 20_000 + slot * 50;
    format!("{lo}-{}", lo + 49)
}

/// Options for a [`Cluster`].
#[derive(Debug, Clone)]
pub struct Opts {
    pub runners: usize,
    pub observer: bool,
    pub poll_interval: &'static str,
    pub heartbeat_interval: &'static str,
    pub heartbeat_timeout: &'static str,
    pub max_attempts: u32,
    pub token: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            runners: 1,
            observer: true,
            poll_interval: "100ms",
            heartbeat_interval: "200ms",
            heartbeat_timeout: "1s",
            max_attempts: 3,
            token: None,
        }
    }
}

/// How a runner's (or the observer's) clone is made and what its process is started with.
#[derive(Debug, Clone, Default)]
pub struct CloneSetup {
    /// Clone from this URL (with `env`) instead of the master's path.
    pub clone_from: Option<String>,
    /// After cloning, point `origin` at this URL.
    pub origin: Option<String>,
    /// Extra arguments, before REPO_CLONE.
    pub args: Vec<String>,
    /// Extra environment for the process (and for the `git clone`).
    pub env: Vec<(String, String)>,
    /// Talk to this address instead of the dispatcher's (a [`Proxy`], say).
    pub dispatcher: Option<String>,
}

impl CloneSetup {
    /// A setup with only these extra arguments.
    pub fn args(args: &[&str]) -> CloneSetup {
        CloneSetup {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..CloneSetup::default()
        }
    }
}

/// `git clone -q URL dest` with extra environment.
pub fn clone_url(url: &str, dest: &Path, env: &[(String, String)]) -> Result<()> {
    let out = Command::new("git")
        .args(["clone", "-q", url])
        .arg(dest)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .context("running git clone")?;
    if !out.status.success() {
        bail!("git clone {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A dispatcher, runners and an observer over a fresh master repository in a temp dir.
/// Dropping it kills every process it started and every step process left behind.
pub struct Cluster {
    pub bins: Bins,
    pub opts: Opts,
    pub master: Master,
    pub results: PathBuf,
    pub dispatcher: Option<Proc>,
    pub addr: String,
    pub runners: Vec<Proc>,
    /// The address each runner registered as (same order as `runners`).
    pub runner_addrs: Vec<String>,
    /// Each runner's clone (same order as `runners`).
    pub runner_clones: Vec<PathBuf>,
    /// Dispatchers that were killed and replaced, oldest first (their logs stay readable).
    pub past_dispatchers: Vec<Proc>,
    pub observer: Option<Proc>,
    observer_clone: PathBuf,
    next_clone: u32,

    // Last, so it is removed after every process is dead.
    pub tmp: tempfile::TempDir,
}

/// How long any single wait in a test may take before it counts as a failure.
pub const WAIT: Duration = Duration::from_secs(30);

impl Cluster {
    pub fn start(bins: Bins, opts: Opts) -> Result<Cluster> {
        let tmp = tempfile::Builder::new().prefix("tinyci-test-").tempdir()?;
        let master = Master::from_fixture(&tmp.path().join("master"))?;
        let results = tmp.path().join("test_results");
        let observer_clone = master.clone_to(&tmp.path().join("observer_clone"))?;
        let mut c = Cluster {
            bins,
            opts,
            master,
            results,
            dispatcher: None,
            addr: String::new(),
            runners: Vec::new(),
            runner_addrs: Vec::new(),
            runner_clones: Vec::new(),
            past_dispatchers: Vec::new(),
            observer: None,
            observer_clone,
            next_clone: 0,

            tmp,
        };
        c.start_dispatcher("0")?;
        for _ in 0..c.opts.runners {
            c.add_runner()?;
        }
        if c.opts.observer {
            c.start_observer()?;
        }
        Ok(c)
    }

    /// Starts a cluster and waits for the result of its first commit (the observer reports
    /// the tip at start): a cluster that has shown it works.
    pub fn start_ready(bins: Bins, opts: Opts) -> Result<Cluster> {
        let c = Cluster::start(bins, opts)?;
        c.wait_result(&c.master.head()?, WAIT)?;
        Ok(c)
    }

    fn token_env(&self, cmd: &mut Command) {
        match &self.opts.token {
            Some(t) => cmd.env("TINYCI_TOKEN", t),
            None => cmd.env_remove("TINYCI_TOKEN"),
        };
    }

    /// Starts (or restarts) the dispatcher on `port` ("0" for any) and waits until it listens.
    pub fn start_dispatcher(&mut self, port: &str) -> Result<()> {
        let mut cmd = Command::new(&self.bins.dispatcher);
        cmd.args(["--host", "127.0.0.1", "--port", port, "--results-dir"])
            .arg(&self.results)
            .args([
                "--heartbeat-interval",
                self.opts.heartbeat_interval,
                "--heartbeat-timeout",
                self.opts.heartbeat_timeout,
                "--max-attempts",
                &self.opts.max_attempts.to_string(),
            ]);
        self.token_env(&mut cmd);
        let p = Proc::spawn("dispatcher", cmd)?;
        let line = p.wait_for(&["listening", "addr="], WAIT)?;
        self.addr = field(&line, "addr").ok_or_else(|| anyhow!("no addr in {line:?}"))?;
        self.dispatcher = Some(p);
        Ok(())
    }

    pub fn dispatcher(&self) -> &Proc {
        self.dispatcher.as_ref().expect("dispatcher running")
    }

    /// Clones the master for a new runner, starts it, and waits until the dispatcher has
    /// registered it. Returns its index.
    pub fn add_runner(&mut self) -> Result<usize> {
        self.add_runner_with(&CloneSetup::default())
    }

    /// Like [`Cluster::add_runner`], with the clone made and the runner started as `setup`
    /// says.
    pub fn add_runner_with(&mut self, setup: &CloneSetup) -> Result<usize> {
        let clone = self.new_clone(setup)?;
        self.add_runner_on(clone, setup)
    }

    /// Makes a new clone for a runner as `setup` says (not started).
    pub fn new_clone(&mut self, setup: &CloneSetup) -> Result<PathBuf> {
        self.next_clone += 1;
        let dest = self
            .tmp
            .path()
            .join(format!("runner_clone_{}", self.next_clone));
        match &setup.clone_from {
            None => {
                self.master.clone_to(&dest)?;
            }
            Some(url) => clone_url(url, &dest, &setup.env)?,
        };
        if let Some(url) = &setup.origin {
            git(&dest, &["remote", "set-url", "origin", url])?;
        }
        Ok(dest)
    }

    /// Starts a runner on an existing `clone` with `setup`'s arguments and environment, and
    /// waits until it is registered. Returns its index.
    pub fn add_runner_on(&mut self, clone: PathBuf, setup: &CloneSetup) -> Result<usize> {
        let (p, addr) = self.spawn_runner_with(&clone, setup)?;
        self.runners.push(p);
        self.runner_addrs.push(addr);
        self.runner_clones.push(clone);
        Ok(self.runners.len() - 1)
    }

    /// Starts a runner on `clone` and returns at once (no wait for it to listen): for tests
    /// of what a runner refuses at start.
    pub fn spawn_runner_raw(&self, clone: &Path, setup: &CloneSetup) -> Result<Proc> {
        let mut cmd = Command::new(&self.bins.runner);
        cmd.args(["--host", "127.0.0.1", "--port-range"])
            .arg(runner_port_range())
            .args([
                "--dispatcher-server",
                setup.dispatcher.as_deref().unwrap_or(&self.addr),
            ])
            .args(&setup.args)
            .arg(clone);
        cmd.envs(setup.env.iter().map(|(k, v)| (k, v)));
        self.token_env(&mut cmd);
        let name = clone
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("runner");
        Proc::spawn(name, cmd)
    }

    /// Kills runner `i` (if still alive) and starts a new one on the same clone, waiting
    /// until it is registered.
    pub fn restart_runner(&mut self, i: usize) -> Result<()> {
        self.runners[i].kill();
        let clone = self.runner_clones[i].clone();
        let (p, addr) = self.spawn_runner_with(&clone, &CloneSetup::default())?;
        self.runners[i] = p;
        self.runner_addrs[i] = addr;
        Ok(())
    }

    /// `kill -9` of the dispatcher, then a new one on the same port and results directory.
    pub fn restart_dispatcher(&mut self) -> Result<()> {
        let mut old = self.dispatcher.take().expect("dispatcher running");
        old.kill();
        self.past_dispatchers.push(old);
        let port = self.addr.rsplit(':').next().unwrap_or("0").to_owned();
        self.start_dispatcher(&port)
    }

    /// SIGTERM to the dispatcher; waits for it to exit (it must, with status 0), then starts
    /// a new one on the same port and results directory.
    pub fn terminate_and_restart_dispatcher(&mut self) -> Result<()> {
        let mut old = self.dispatcher.take().expect("dispatcher running");
        let status = old.terminate(WAIT);
        self.past_dispatchers.push(old);
        match status {
            Some(st) if st.success() => {}
            other => bail!("the dispatcher did not exit cleanly on SIGTERM: {other:?}"),
        }
        let port = self.addr.rsplit(':').next().unwrap_or("0").to_owned();
        self.start_dispatcher(&port)
    }

    /// The logs of every dispatcher this cluster ran, oldest first.
    pub fn all_dispatcher_logs(&self) -> String {
        self.past_dispatchers
            .iter()
            .chain(self.dispatcher.as_ref())
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn_runner_with(&self, clone: &Path, setup: &CloneSetup) -> Result<(Proc, String)> {
        let p = self.spawn_runner_raw(clone, setup)?;
        let line = p.wait_for(&["listening", "addr="], WAIT)?;
        let addr = field(&line, "addr").ok_or_else(|| anyhow!("no addr in {line:?}"))?;
        // Registered: the dispatcher lists it (the typed status, not its log).
        self.wait_status(&format!("runner {addr} registered"), |s| {
            s.runners.iter().any(|r| r.addr == addr)
        })?;
        Ok((p, addr))
    }

    /// Asks the dispatcher (as a `tinyci` client would) and returns its answer.
    pub fn ask<T>(
        &self,
        f: impl for<'a> FnOnce(
            &'a mut tinyci::client::Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tinyci::client::ClientError>> + 'a>,
        >,
    ) -> Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c =
                tinyci::client::Client::connect(&self.addr, self.opts.token.as_deref()).await?;
            f(&mut c).await
        })
        .map_err(anyhow::Error::from)
    }

    /// The dispatcher's status: queue, runners, counts.
    pub fn status(&self) -> Result<tinyci::proto::DispatcherStatus> {
        self.ask(|c| Box::pin(c.status()))
    }

    /// One run as the dispatcher knows it; `None` while it knows nothing of the commit.
    pub fn run_detail(&self, sha: &str) -> Result<Option<tinyci::proto::RunDetail>> {
        let sha = sha.to_owned();
        match self.ask(move |c| Box::pin(async move { c.run(&sha).await })) {
            Ok(d) => Ok(Some(d)),
            Err(e) => match e.downcast_ref::<tinyci::client::ClientError>() {
                Some(tinyci::client::ClientError::NotFound(_)) => Ok(None),
                _ => Err(e),
            },
        }
    }

    /// Polls the status until `ok` holds (or [`WAIT`] passes, an error naming `what`).
    pub fn wait_status(
        &self,
        what: &str,
        ok: impl Fn(&tinyci::proto::DispatcherStatus) -> bool,
    ) -> Result<tinyci::proto::DispatcherStatus> {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = self.status();
            if let Ok(s) = &last {
                if ok(s) {
                    return last;
                }
            }
            if Instant::now() >= deadline {
                bail!("{what}: not within {WAIT:?}; last status: {last:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the dispatcher has `sha` recorded (queued, running or finished).
    pub fn wait_known(&self, sha: &str) -> Result<tinyci::proto::RunDetail> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(d) = self.run_detail(sha)? {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                bail!("{sha} never reached the dispatcher within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_observer(&mut self) -> Result<()> {
        self.start_observer_with(&CloneSetup::default())
    }

    /// The observer's clone.
    pub fn observer_clone(&self) -> &Path {
        &self.observer_clone
    }

    /// Starts the observer with `setup`'s arguments and environment (its `origin`, if set,
    /// replaces the observer clone's origin URL; `clone_from` is ignored: the clone exists)
    /// and waits until it watches.
    pub fn start_observer_with(&mut self, setup: &CloneSetup) -> Result<()> {
        let p = self.spawn_observer_raw(setup)?;
        p.wait_for(&["watching"], WAIT)?;
        self.observer = Some(p);
        Ok(())
    }

    /// Starts an observer on the observer clone and returns at once.
    pub fn spawn_observer_raw(&self, setup: &CloneSetup) -> Result<Proc> {
        if let Some(url) = &setup.origin {
            git(&self.observer_clone, &["remote", "set-url", "origin", url])?;
        }
        self.spawn_observer_on(&self.observer_clone, setup)
    }

    /// Starts an observer on `clone` and returns at once.
    pub fn spawn_observer_on(&self, clone: &Path, setup: &CloneSetup) -> Result<Proc> {
        let mut cmd = Command::new(&self.bins.observer);
        cmd.args([
            "--dispatcher-server",
            &self.addr,
            "--poll-interval",
            self.opts.poll_interval,
        ])
        .args(&setup.args)
        .arg(clone);
        cmd.envs(setup.env.iter().map(|(k, v)| (k, v)));
        self.token_env(&mut cmd);
        Proc::spawn("observer", cmd)
    }

    /// Commits to the master; returns the sha.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> Result<String> {
        self.master.commit(message, files)
    }

    pub fn json_path(&self, sha: &str) -> PathBuf {
        self.results.join(format!("{sha}.json"))
    }

    /// The run's log (bytes that are not UTF-8 replaced, so a step's odd output shows).
    pub fn log_text(&self, sha: &str) -> String {
        let bytes = std::fs::read(self.results.join(format!("{sha}.log"))).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits for `<sha>.json` and returns it parsed.
    pub fn wait_result(&self, sha: &str, within: Duration) -> Result<Value> {
        let path = self.json_path(sha);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(text) = std::fs::read(&path) {
                return serde_json::from_slice(&text)
                    .with_context(|| format!("parsing {}", path.display()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "no result for {sha} within {within:?}\n--- dispatcher log:\n{}\n--- runner logs:\n{}\n--- observer log:\n{}",
                    self.dispatcher.as_ref().map(Proc::log).unwrap_or_default(),
                    self.runners.iter().map(Proc::log).collect::<Vec<_>>().join("\n---\n"),
                    self.observer.as_ref().map(Proc::log).unwrap_or_default(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `<sha>.json` files present.
    pub fn result_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.results)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits until the dispatcher assigns `sha` (its run lists an attempt); returns the
    /// runner's index and address.
    pub fn wait_assigned(&self, sha: &str) -> Result<(usize, String)> {
        let deadline = Instant::now() + WAIT;
        let addr = loop {
            if let Some(a) = self
                .run_detail(sha)?
                .and_then(|d| d.attempts.last().map(|a| a.runner.clone()))
            {
                break a;
            }
            if Instant::now() >= deadline {
                bail!("{sha} was not assigned within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let i = self
            .runner_index(&addr)
            .ok_or_else(|| anyhow!("{addr} is not one of this cluster's runners"))?;
        Ok((i, addr))
    }

    /// Index of the runner registered as `addr`.
    pub fn runner_index(&self, addr: &str) -> Option<usize> {
        self.runner_addrs.iter().position(|a| a == addr)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.observer.take();
        self.runners.clear();
        self.dispatcher.take();
        // Every step process a runner of this cluster started carries its clone, which
        // lives under our temp dir: those, and only those, are ours to sweep.
        let ours =
            std::fs::canonicalize(self.tmp.path()).unwrap_or_else(|_| self.tmp.path().into());
        let mut prefix = b"TINYCI_RUNNER_CLONE=".to_vec();
        prefix.extend_from_slice(ours.as_os_str().as_encoded_bytes());
        prefix.push(b'/');
        for pid in processes_with_env(|kv| kv.starts_with(&prefix)) {
            // SAFETY: kill(2) on a process started in one of this cluster's clones.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The value of `key=` in a tracing line.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_owned())
}

/// Live processes (not zombies) whose environment has `TINYCI_COMMIT=<sha>`: the
/// processes of that commit's steps.
pub fn step_processes(sha: &str) -> Vec<i32> {
    let needle = format!("TINYCI_COMMIT={sha}");
    processes_with_env(|kv| kv == needle.as_bytes())
}

/// Live processes (not zombies) with an environment entry `KEY=value` that `wanted` accepts.
pub fn processes_with_env(wanted: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(&wanted) {
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            if !zombie {
                out.push(pid);
            }
        }
    }
    out
}

/// Waits until `f` returns true.
pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !f() {
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Step names and statuses of a result.
pub fn steps(result: &Value) -> Vec<(String, String)> {
    result["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("").to_owned(),
                        s["status"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Milliseconds since the epoch of an RFC 3339 field.
pub fn time_ms(result: &Value, key: &str) -> Result<u128> {
    let s = result[key]
        .as_str()
        .ok_or_else(|| anyhow!("no {key} in {result}"))?;
    let t = humantime::parse_rfc3339(s)?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_millis())
}

/// A TCP proxy for partition tests: forwards between its clients and `upstream` until
/// told to black-hole — then it keeps every connection open and accepts new ones, but
/// forwards nothing in either direction (nor any close), as a stateful middlebox that lost
/// its route does — and forwards again once healed. Everything stops on drop.
pub struct Proxy {
    pub addr: String,
    forwarding: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Result<Proxy> {
        use std::sync::atomic::AtomicBool;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let forwarding = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (fwd, halt, all) = (forwarding.clone(), stop.clone(), conns.clone());
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => return,
                };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue; // the client sees its connection close
                };
                let _ = client.set_nonblocking(false);
                let pairs = [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ];
                if let Ok(mut v) = all.lock() {
                    v.extend([client, server]);
                }
                for pair in pairs {
                    if let (Ok(from), Ok(to)) = pair {
                        let (fwd, halt) = (fwd.clone(), halt.clone());
                        std::thread::spawn(move || pump(from, to, &fwd, &halt));
                    }
                }
            }
        });
        Ok(Proxy {
            addr,
            forwarding,
            stop,
            conns,
        })
    }

    /// Stops forwarding (without closing anything).
    pub fn black_hole(&self) {
        self.forwarding.store(false, Ordering::SeqCst);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.forwarding.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while the proxy forwards; holds what it read while it does not.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    forwarding: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 * 1024];
    let wait_forwarding = || {
        while !forwarding.load(Ordering::SeqCst) {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        !stop.load(Ordering::Relaxed)
    };
    loop {
        if !wait_forwarding() {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => 0,
        };
        // What was read while black-holed (or a close) waits until the proxy heals.
        if !wait_forwarding() {
            return;
        }
        if n == 0 {
            let _ = to.shutdown(std::net::Shutdown::Write);
            return;
        }
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(std::net::Shutdown::Read);
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(v) = self.conns.lock() {
            for c in v.iter() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Live processes (not zombies, not this test process, none of `except`) whose working
/// directory is `dir` or below it, or whose command line names a path under `dir`: what a
/// runner or observer of that clone started or left behind. Each as `pid comm: cmdline (cwd)`.
pub fn processes_in(dir: &Path, except: &[u32]) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || except.contains(&(pid as u32)) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().starts_with('Z'))
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let cwd = std::fs::read_link(e.path().join("cwd")).ok();
        let in_cwd = cwd.as_deref().is_some_and(|c| c.starts_with(&dir));
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let in_cmdline = cmdline
            .windows(needle.len().max(1))
            .any(|w| w == needle.as_slice());
        if in_cwd || in_cmdline {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            out.push(format!(
                "{pid} {}: {} (cwd {})",
                comm.trim(),
                args.join(" "),
                cwd.map(|c| c.display().to_string()).unwrap_or_default()
            ));
        }
    }
    out
}
