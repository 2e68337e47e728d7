//! Origins for the runner's and the observer's clones beyond a local path: a `git daemon`
//! (`git://`), a dumb HTTP server (`http://`, written here), an ssh "server" that is a
//! `GIT_SSH_COMMAND` wrapper running the remote command locally, and a TCP server that
//! accepts connections and never answers. Each is stopped on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{wait_until, Proc, WAIT};

/// A port nobody listens on right now (bound on port 0, then released). Another process
/// may take it before we do: callers retry on a collision.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding port 0")?;
    Ok(l.local_addr()?.port())
}

/// `git daemon` serving every repository under `base` on a port of its own.
pub struct GitDaemon {
    pub port: u16,
    proc: Proc,
}

impl GitDaemon {
    /// Starts the daemon; picks a free port and retries if another process took it first.
    pub fn start(base: &Path) -> Result<GitDaemon> {
        // `git daemon` forks the real daemon and stays its parent: killing the `git` left
        // the daemon running. Start the program itself, so the pid we kill is the daemon.
        let out = Command::new("git").arg("--exec-path").output()?;
        let exec_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let program = Path::new(&exec_path).join("git-daemon");
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_port()?;
            let mut cmd = Command::new(&program);
            cmd.args([
                "--export-all",
                "--reuseaddr",
                "--verbose",
                "--informative-errors",
            ])
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()));
            let mut p = Proc::spawn("git-daemon", cmd)?;
            let deadline = Instant::now() + WAIT;
            loop {
                if p.count(&["Ready to rumble"]) > 0 {
                    return Ok(GitDaemon { port, proc: p });
                }
                if !p.is_running() || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            last = p.log();
        }
        bail!("git daemon did not start; last log:\n{last}")
    }

    /// The `git://` URL of `repo` (a path relative to the base).
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }

    /// What the daemon logged.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// A dumb HTTP server (GET and HEAD of files under a root, nothing else): git's "dumb"
/// `http://` transport, which needs `git update-server-info` in the served repository.
pub struct HttpServer {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(root: &Path) -> Result<HttpServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let root = std::fs::canonicalize(root)?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        requests2.fetch_add(1, Ordering::Relaxed);
                        let root = root.clone();
                        std::thread::spawn(move || {
                            let _ = serve_http(stream, &root);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(HttpServer {
            addr,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves requests on one connection (keep-alive) until the client closes it.
fn serve_http(stream: TcpStream, root: &Path) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        // Headers up to the blank line; a GET or HEAD has no body.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let mut parts = request.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let path = target.split('?').next().unwrap_or("/");
        let file = safe_join(root, path);
        let body = match (&file, method) {
            (Some(f), "GET" | "HEAD") => std::fs::read(f).ok().filter(|_| f.is_file()),
            _ => None,
        };
        match body {
            Some(body) => {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )?;
                if method == "GET" {
                    out.write_all(&body)?;
                }
            }
            None => {
                out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            }
        }
        out.flush()?;
    }
}

/// `root` + a URL path, refusing anything that would climb out of `root`.
fn safe_join(root: &Path, url_path: &str) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    for c in Path::new(url_path.trim_start_matches('/')).components() {
        match c {
            Component::Normal(n) => p.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(p)
}

/// A TCP server that accepts every connection and never sends a byte (nor closes): an
/// origin that hangs. Connections are held until the server is dropped.
pub struct HangingServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HangingServer {
    pub fn start() -> Result<HangingServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        held.push(stream);
                        accepted2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(HangingServer {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` connections were accepted.
    pub fn wait_accepted(&self, n: usize, within: Duration) -> Result<()> {
        wait_until(
            &format!("{n} connection(s) to the hanging origin"),
            within,
            || self.accepted() >= n,
        )
    }

    /// A `git://` URL on this server.
    pub fn git_url(&self) -> String {
        format!("git://{}/master", self.addr)
    }

    /// An `http://` URL on this server.
    pub fn http_url(&self) -> String {
        format!("http://{}/master.git", self.addr)
    }
}

impl Drop for HangingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An ssh stand-in: a script to use as `GIT_SSH_COMMAND` that skips ssh's options and
/// the host and runs the remote command (`git-upload-pack '/path'`) locally. Each call is
/// logged (host, command and working directory) so a test can tell who used it.
pub struct FakeSsh {
    pub script: PathBuf,
    pub log: PathBuf,
}

impl FakeSsh {
    pub fn install(dir: &Path) -> Result<FakeSsh> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let script = dir.join("fake-ssh");
        let log = dir.join("fake-ssh.log");
        let body = format!(
            r#"#!/bin/sh
# A stand-in for ssh: runs the remote command on this machine.
while [ $# -gt 0 ]; do
    case "$1" in
        -o|-p|-l|-i|-F|-E|-J) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
host="$1"
[ $# -gt 0 ] && shift
# `ssh -G host` (git probing for OpenSSH) has no command.
[ $# -eq 0 ] && exit 0
printf '%s\t%s\t%s\n' "$host" "$*" "$(pwd)" >> '{log}'
exec sh -c "$*"
"#,
            log = log.display()
        );
        std::fs::write(&script, body)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(FakeSsh { script, log })
    }

    /// The environment that makes git use this script for ssh.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "GIT_SSH_COMMAND".to_string(),
            self.script.display().to_string(),
        )]
    }

    /// Every logged call: (host, command, working directory).
    pub fn calls(&self) -> Vec<(String, String, String)> {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, '\t');
                Some((
                    it.next()?.to_owned(),
                    it.next()?.to_owned(),
                    it.next()?.to_owned(),
                ))
            })
            .collect()
    }
}
