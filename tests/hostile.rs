//! Hostile input against the real binaries over loopback (DESIGN.md, "Bad input"): every
//! kind of bad bytes, bad hello, bad commit id, silent or flooding peer, bad `.tinyci.toml`
//! and misbehaving step gets a clear log line, costs only its own connection or run, and
//! never takes a process down or stops real work from going through.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use testkit::*;
use tinyci::proto::{
    decode, encode, CommitId, Connection, FromDispatcher, HeldJob, HeldVerdict, Hello, HelloReply,
    JobId, Role, RunReport, RunStatus, RunnerId, ToDispatcher, HANDSHAKE_TIMEOUT, MAGIC,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};

fn bins() -> Bins {
    testkit::bins!()
}

// ---------------------------------------------------------------------------------------
// Look-alikes of the wire enums with `String` where the real ones have a `CommitId`, so a
// test can put on the wire what the real types refuse to build. Variant order (= bincode
// variant index) must match the real enums; `look_alikes_match_the_real_encoding` checks.

#[derive(Serialize)]
#[allow(dead_code)]
enum FakeToDispatcher {
    Submit {
        commits: Vec<String>,
        branch: Option<String>,
        front: bool,
        rerun: bool,
    },
    Register {
        addr: String,
        held: Option<FakeHeldJob>,
        paused: Option<String>,
    },
}

#[derive(Serialize)]
struct FakeHeldJob {
    job: JobId,
    commit: String,
    finished: bool,
}

#[derive(Serialize)]
#[allow(dead_code)]
enum FakeFromDispatcher {
    Submitted {
        queued: u32,
        known: u32,
    },
    Registered {
        runner: RunnerId,
        held: Option<HeldVerdict>,
        heartbeat_timeout: Duration,
    },
    Assign {
        job: JobId,
        commit: String,
    },
}

const GOOD_SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// Commit ids no message may carry: path traversal, non-hex, wrong case, wrong length.
fn bad_commit_ids() -> Vec<String> {
    vec![
        "../../etc/passwd".into(),
        format!("../../tinyci-hostile-{}", std::process::id()),
        "/etc/passwd".into(),
        "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz".into(),
        GOOD_SHA.to_uppercase(),
        format!("{GOOD_SHA}0"),
        String::new(),
    ]
}

// ---------------------------------------------------------------------------------------
// Raw sockets.

/// A plain blocking TCP connection for writing arbitrary bytes.
struct Raw {
    s: TcpStream,
    /// Our side's address: the dispatcher's log names it as `peer=…` on the connection span.
    local: SocketAddr,
}

impl Raw {
    fn connect(addr: &str) -> Result<Raw> {
        let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        let local = s.local_addr()?;
        Ok(Raw { s, local })
    }

    /// The needle that picks this connection's lines out of the dispatcher's log.
    fn peer(&self) -> String {
        format!("peer={}}}", self.local)
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes)?;
        Ok(())
    }

    fn send_frame(&mut self, body: &[u8]) -> Result<()> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        self.send_raw(&f)
    }

    fn send_msg<M: Serialize>(&mut self, msg: &M) -> Result<()> {
        self.send_frame(&encode(msg)?)
    }

    fn read_frame(&mut self, within: Duration) -> Result<Vec<u8>> {
        self.s.set_read_timeout(Some(within))?;
        let mut len = [0u8; 4];
        self.s
            .read_exact(&mut len)
            .context("reading a length prefix")?;
        let n = u32::from_be_bytes(len) as usize;
        ensure!(n <= MAX_FRAME_LEN, "peer sent a {n}-byte frame");
        let mut body = vec![0u8; n];
        self.s
            .read_exact(&mut body)
            .context("reading a frame body")?;
        Ok(body)
    }

    fn recv<M: DeserializeOwned>(&mut self) -> Result<M> {
        Ok(decode(&self.read_frame(WAIT)?)?)
    }

    /// The reason of the `HelloReply::Refused` the peer must send next.
    fn refused(&mut self) -> Result<String> {
        match self.recv::<HelloReply>()? {
            HelloReply::Refused { reason } => Ok(reason),
            other => bail!("expected Refused, got {other:?}"),
        }
    }

    /// Reads (and discards) until the peer closes; returns how long that took.
    fn wait_closed(&mut self, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        let deadline = start + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "connection still open after {within:?}");
            self.s.set_read_timeout(Some(left))?;
            match self.s.read(&mut buf) {
                Ok(0) => return Ok(start.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("connection still open after {within:?}")
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(start.elapsed())
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn hello(magic: u32, version: u32, role: u8, token: &str) -> Hello {
    Hello {
        magic,
        version,
        role,
        token: token.into(),
    }
}

/// A well-formed hello as `role`.
fn good_hello(role: Role, token: &str) -> Hello {
    hello(MAGIC, PROTOCOL_VERSION, role.code(), token)
}

/// Connects and completes the handshake as `role` by hand.
fn welcomed(addr: &str, role: Role, token: &str) -> Result<Raw> {
    let mut r = Raw::connect(addr)?;
    r.send_msg(&good_hello(role, token))?;
    match r.recv::<HelloReply>()? {
        HelloReply::Welcome { version } => {
            ensure!(
                version == PROTOCOL_VERSION,
                "welcomed with version {version}"
            );
            Ok(r)
        }
        other => bail!("expected Welcome, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Process checks.

fn assert_alive(p: &mut Proc) {
    assert!(p.is_running(), "{} died; its log:\n{}", p.name, p.log());
}

fn dispatcher_alive(c: &mut Cluster) {
    assert_alive(c.dispatcher.as_mut().expect("dispatcher started"));
}

/// A `kB` field of `/proc/<pid>/status` (VmHWM, VmRSS…), in bytes.
fn proc_status_bytes(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad line {line:?}"))?
        .parse()?;
    Ok(kb * 1024)
}

/// How many sockets process `pid` has open.
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Waits until the dispatcher's open sockets satisfy `ok`, naming the count on failure.
fn wait_sockets(pid: u32, what: &str, ok: impl Fn(usize) -> bool) -> Result<()> {
    let last = std::cell::Cell::new(0);
    wait_until(what, WAIT, || {
        last.set(open_sockets(pid));
        ok(last.get())
    })
    .with_context(|| format!("the dispatcher has {} sockets open", last.get()))
}

/// A string no other test (or test process) uses.
fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The tip the observer reported at start gets a `success` result (the fixture's Python
/// tests, run for real).
fn tip_succeeds(c: &Cluster) -> Result<()> {
    let sha = c.master.head()?;
    let r = c.wait_result(&sha, WAIT)?;
    ensure!(
        r["status"] == "success",
        "tip {sha}: {r}\n--- log:\n{}",
        c.log_text(&sha)
    );
    Ok(())
}

/// The attack cost nothing: the dispatcher is alive, the tip it was given at start
/// succeeded, a fresh commit succeeds, and it is still alive afterwards.
fn still_works(c: &mut Cluster, what: &str) -> Result<()> {
    dispatcher_alive(c);
    tip_succeeds(c)?;
    still_serves(c, what)?;
    dispatcher_alive(c);
    Ok(())
}

/// Real work still goes through: a fresh commit gets a `success` result.
fn still_serves(c: &Cluster, what: &str) -> Result<()> {
    let toml = spec(&[("ok", "echo still serving", "30s")]);
    let sha = c.commit(what, &[(".tinyci.toml", &toml), ("after.txt", what)])?;
    let r = c.wait_result(&sha, WAIT)?;
    ensure!(r["status"] == "success", "after {what}: {r}");
    Ok(())
}

/// Every path a careless `dir.join(commit)` (plus a suffix) could reach from the results
/// directory or its journal directory, with what is there now.
fn reachable(c: &Cluster, bad: &str) -> Vec<(PathBuf, Option<(u64, std::time::SystemTime)>)> {
    let mut out = Vec::new();
    for dir in [c.results.clone(), c.results.join(".tinyci")] {
        for suffix in ["", ".json", ".log", ".json.tmp"] {
            let p = dir.join(format!("{bad}{suffix}"));
            let meta = std::fs::metadata(&p)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH)));
            out.push((p, meta));
        }
    }
    out
}

/// Nothing reachable from `bad` changed since `before`, and the results directory holds
/// only `<sha>.json`, `<sha>.log` and the journal directory.
fn nothing_written_outside(
    c: &Cluster,
    bad: &str,
    before: &[(PathBuf, Option<(u64, std::time::SystemTime)>)],
) -> Result<()> {
    for ((p, now), (_, then)) in reachable(c, bad).iter().zip(before) {
        ensure!(
            now == then,
            "{} was written ({then:?} -> {now:?})",
            p.display()
        );
    }
    for entry in std::fs::read_dir(&c.results)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let ok = name == ".tinyci"
            || name
                .strip_suffix(".json")
                .or_else(|| name.strip_suffix(".log"))
                .is_some_and(|stem| CommitId::parse(stem).is_ok());
        ensure!(ok, "unexpected file {name:?} in the results directory");
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn look_alikes_match_the_real_encoding() -> Result<()> {
    let real = |m: &FakeToDispatcher| decode::<ToDispatcher>(&encode(m).unwrap());
    assert_eq!(
        real(&FakeToDispatcher::Submit {
            commits: vec![GOOD_SHA.into()],
            branch: None,
            front: false,
            rerun: false,
        })?,
        ToDispatcher::Submit {
            commits: vec![CommitId::parse(GOOD_SHA)?],
            branch: None,
            front: false,
            rerun: false,
        }
    );
    let job = JobId::new();
    assert_eq!(
        real(&FakeToDispatcher::Register {
            addr: "h:1".into(),
            held: Some(FakeHeldJob {
                job,
                commit: GOOD_SHA.into(),
                finished: true
            }),
            paused: Some("p".into()),
        })?,
        ToDispatcher::Register {
            addr: "h:1".into(),
            held: Some(HeldJob {
                job,
                commit: CommitId::parse(GOOD_SHA)?,
                finished: true
            }),
            paused: Some("p".into()),
        }
    );
    assert_eq!(
        decode::<FromDispatcher>(&encode(&FakeFromDispatcher::Assign {
            job,
            commit: GOOD_SHA.into()
        })?)?,
        FromDispatcher::Assign {
            job,
            commit: CommitId::parse(GOOD_SHA)?
        }
    );
    for bad in bad_commit_ids() {
        let body = encode(&FakeFromDispatcher::Assign { job, commit: bad })?;
        let e = decode::<FromDispatcher>(&body).unwrap_err();
        assert!(e.to_string().contains("invalid commit id"), "{e}");
    }
    Ok(())
}

#[test]
fn garbage_first_frame_is_refused_and_logged() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;

    // A well-framed body that is no hello.
    let mut r = Raw::connect(&c.addr)?;
    r.send_frame(&[0xff; 5])?;
    let reason = r.refused()?;
    assert!(reason.contains("malformed message"), "{reason}");
    r.wait_closed(Duration::from_secs(3))?;
    c.dispatcher().wait_for(
        &[
            "handshake failed; connection closed",
            &r.peer(),
            "malformed message",
        ],
        WAIT,
    )?;

    // Unframed noise (its first four bytes make an absurd length).
    let mut noise = Vec::with_capacity(512);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..512 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    noise[0] = 0x9c;
    let mut r = Raw::connect(&c.addr)?;
    r.send_raw(&noise)?;
    let reason = r.refused()?;
    assert!(reason.contains("frame longer than"), "{reason}");
    r.wait_closed(Duration::from_secs(3))?;
    c.dispatcher().wait_for(
        &[
            "handshake failed; connection closed",
            &r.peer(),
            "frame longer than",
        ],
        WAIT,
    )?;

    still_works(&mut c, "after garbage")?;
    Ok(())
}

#[test]
fn http_request_is_refused_and_logged() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    let mut r = Raw::connect(&c.addr)?;
    r.send_raw(
        format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n",
            c.addr
        )
        .as_bytes(),
    )?;
    // "GET " read as a length is ~1.2 GB: refused at once, not after a 5 s wait.
    let reason = r.refused()?;
    assert!(reason.contains("frame longer than"), "{reason}");
    let took = r.wait_closed(Duration::from_secs(3))?;
    assert!(took < HANDSHAKE_TIMEOUT, "closed only after {took:?}");
    c.dispatcher().wait_for(
        &[
            "handshake failed; connection closed",
            &r.peer(),
            "frame longer than",
        ],
        WAIT,
    )?;
    still_works(&mut c, "after http")?;
    Ok(())
}

#[test]
fn length_prefix_near_4_gib_is_refused_before_buffering() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    let pid = c.dispatcher().pid();
    let mut r = Raw::connect(&c.addr)?;
    let mut bytes = 0xFFFF_FFF0u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(b"just the start of a 4 GiB body");
    r.send_raw(&bytes)?;
    let reason = r.refused()?;
    assert!(
        reason.contains(&format!("frame longer than the {MAX_FRAME_LEN}-byte limit")),
        "{reason}"
    );
    let took = r.wait_closed(Duration::from_secs(3))?;
    assert!(took < HANDSHAKE_TIMEOUT, "closed only after {took:?}");
    c.dispatcher().wait_for(
        &[
            "handshake failed; connection closed",
            &r.peer(),
            "frame longer than",
        ],
        WAIT,
    )?;
    // The same after the handshake, from an observer and from a registered runner.
    for role in [Role::Observer, Role::Runner] {
        let mut r = welcomed(&c.addr, role, "")?;
        if role == Role::Runner {
            r.send_msg(&ToDispatcher::Register {
                addr: "127.0.0.1:1".into(),
                held: None,
                paused: None,
            })?;
            let reply = r.recv::<FromDispatcher>()?;
            ensure!(
                matches!(reply, FromDispatcher::Registered { .. }),
                "{reply:?}"
            );
        }
        r.send_raw(&bytes)?;
        r.wait_closed(Duration::from_secs(3))?;
        c.dispatcher().wait_for(
            &[
                "connection closed on error",
                &r.peer(),
                &format!("role={role}"),
                "frame longer than",
            ],
            WAIT,
        )?;
    }
    c.dispatcher()
        .wait_for(&["runner left", "frame longer than"], WAIT)?;
    // Nothing near the announced size was ever allocated.
    let hwm = proc_status_bytes(pid, "VmHWM")?;
    assert!(hwm < 200 << 20, "dispatcher peak RSS {hwm} bytes");
    still_works(&mut c, "after a 4 GiB prefix")?;
    Ok(())
}

#[test]
fn oversized_frame_after_the_handshake_is_explained_to_the_peer() -> Result<()> {
    let c = Cluster::start(bins(), Opts::default())?;
    let mut r = welcomed(&c.addr, Role::Observer, "")?;
    r.send_raw(&0xFFFF_FFF0u32.to_be_bytes())?;
    // During the handshake the same input gets `Refused` with the reason; after it, a
    // protocol violation gets `FromDispatcher::Error` (as a malformed body does).
    match r.recv::<FromDispatcher>() {
        Ok(FromDispatcher::Error { reason }) => {
            assert!(reason.contains("frame longer than"), "{reason}")
        }
        other => panic!("expected an Error frame naming the limit, got {other:?}"),
    }
    Ok(())
}

#[test]
fn truncated_frame_is_logged_and_costs_only_its_connection() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    let mut r = Raw::connect(&c.addr)?;
    r.send_raw(&[0, 0, 0, 50, 1, 2, 3])?;
    r.s.shutdown(Shutdown::Write)?;
    r.wait_closed(Duration::from_secs(3))?;
    c.dispatcher().wait_for(
        &[
            "handshake failed; connection closed",
            &r.peer(),
            "connection closed in the middle of a frame",
        ],
        WAIT,
    )?;
    // The same in the middle of an observer's conversation.
    let mut r = welcomed(&c.addr, Role::Observer, "")?;
    r.send_raw(&[0, 0, 0, 50, 1, 2, 3])?;
    r.s.shutdown(Shutdown::Write)?;
    r.wait_closed(Duration::from_secs(3))?;
    c.dispatcher().wait_for(
        &[
            "connection closed on error",
            &r.peer(),
            "role=observer",
            "connection closed in the middle of a frame",
        ],
        WAIT,
    )?;
    still_works(&mut c, "after a truncated frame")?;
    Ok(())
}

/// Sends `h` as the first frame; returns the refusal's reason and the connection.
fn refused_hello(c: &Cluster, h: &Hello) -> Result<(String, Raw)> {
    let mut r = Raw::connect(&c.addr)?;
    r.send_msg(h)?;
    let reason = r.refused()?;
    r.wait_closed(Duration::from_secs(3))?;
    Ok((reason, r))
}

#[test]
fn wrong_magic_is_refused_with_the_reason() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    let (reason, r) = refused_hello(
        &c,
        &hello(0xdead_beef, PROTOCOL_VERSION, Role::Observer.code(), ""),
    )?;
    assert!(reason.contains("not a tinyci peer"), "{reason}");
    assert!(reason.contains("magic 0xdeadbeef"), "{reason}");
    c.dispatcher().wait_for(
        &[
            "handshake failed; connection closed",
            &r.peer(),
            "not a tinyci peer (magic 0xdeadbeef)",
        ],
        WAIT,
    )?;
    dispatcher_alive(&mut c);
    still_serves(&c, "after a wrong magic")?;
    Ok(())
}

#[test]
fn wrong_version_is_refused_with_the_reason() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    for version in [PROTOCOL_VERSION + 1, 0, u32::MAX] {
        let (reason, r) = refused_hello(&c, &hello(MAGIC, version, Role::Runner.code(), ""))?;
        assert!(reason.contains("version mismatch"), "{reason}");
        assert!(
            reason.contains(&format!("the peer's is {version}")),
            "{reason}"
        );
        c.dispatcher().wait_for(
            &[
                "handshake failed; connection closed",
                &r.peer(),
                "protocol version mismatch",
            ],
            WAIT,
        )?;
    }
    dispatcher_alive(&mut c);
    still_serves(&c, "after wrong versions")?;
    Ok(())
}

#[test]
fn unknown_or_unserved_role_is_refused_with_the_reason() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    for code in [77u8, 0, 255] {
        let (reason, r) = refused_hello(&c, &hello(MAGIC, PROTOCOL_VERSION, code, ""))?;
        assert!(
            reason.contains(&format!("unknown role code {code}")),
            "{reason}"
        );
        c.dispatcher().wait_for(
            &[
                "handshake failed; connection closed",
                &r.peer(),
                &format!("unknown role code {code}"),
            ],
            WAIT,
        )?;
    }
    // A real role a port does not serve: the runner's status port answers clients only.
    let mut r = Raw::connect(&c.runner_addrs[0])?;
    r.send_msg(&good_hello(Role::Runner, ""))?;
    let reason = r.refused()?;
    assert!(
        reason.contains("role runner is not served here"),
        "{reason}"
    );
    r.wait_closed(Duration::from_secs(3))?;
    // Clients (tinyci) are served by the dispatcher.
    welcomed(&c.addr, Role::Client, "")?;
    dispatcher_alive(&mut c);
    still_serves(&c, "after unknown roles")?;
    Ok(())
}

#[test]
fn silent_peer_is_closed_after_the_handshake_deadline() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    let mut r = Raw::connect(&c.addr)?;
    let took = r.wait_closed(Duration::from_secs(10))?;
    assert!(
        took + Duration::from_millis(500) >= HANDSHAKE_TIMEOUT,
        "closed after only {took:?}"
    );
    c.dispatcher().wait_for(
        &[
            "handshake failed; connection closed",
            &r.peer(),
            "timed out after 5s waiting for the hello",
        ],
        WAIT,
    )?;
    dispatcher_alive(&mut c);
    tip_succeeds(&c)?;
    still_serves(&c, "after a silent peer")?;
    Ok(())
}

#[test]
fn five_hundred_silent_connections_do_not_block_real_work() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    tip_succeeds(&c)?;
    let pid = c.dispatcher().pid();
    let sockets_before = open_sockets(pid);

    let mut silent = Vec::with_capacity(500);
    for _ in 0..500 {
        silent.push(Raw::connect(&c.addr)?);
    }
    // The dispatcher really holds them all (accepted, waiting for a hello)…
    wait_sockets(pid, "the dispatcher to accept 500 connections", |n| {
        n >= 500
    })?;
    // …and still takes a new handshake, a new runner and a new commit meanwhile.
    let t0 = Instant::now();
    drop(welcomed(&c.addr, Role::Observer, "")?);
    c.add_runner()?;
    let toml = spec(&[("ok", "echo served despite 500 silent peers", "30s")]);
    let sha = c.commit("during the siege", &[(".tinyci.toml", &toml)])?;
    let res = c.wait_result(&sha, WAIT)?;
    assert_eq!(res["status"], "success", "{res}");
    let took = t0.elapsed();
    // The result came while the siege was still on (none of the 500 timed out yet).
    let timed_out = c
        .dispatcher()
        .count(&["handshake failed", "waiting for the hello"]);
    assert!(
        timed_out < 500,
        "the result took {took:?}: {timed_out} silent peers had already been dropped"
    );
    // Every silent connection is still ours; the dispatcher drops each one at its deadline.
    wait_until("500 handshake timeouts in the log", WAIT, || {
        c.dispatcher()
            .count(&["handshake failed", "waiting for the hello"])
            >= 500
    })?;
    for r in &mut silent {
        r.wait_closed(Duration::from_secs(5))?;
    }
    drop(silent);
    wait_sockets(pid, "the dispatcher's sockets to be released", |n| {
        n <= sockets_before + 3
    })?;
    eprintln!("result under 500 silent connections in {took:?}");
    dispatcher_alive(&mut c);
    still_serves(&c, "after the siege")?;
    Ok(())
}

#[test]
fn connect_close_flood_leaves_the_dispatcher_serving() -> Result<()> {
    const FLOOD: usize = 3000;
    let mut c = Cluster::start(bins(), Opts::default())?;
    tip_succeeds(&c)?;
    let pid = c.dispatcher().pid();
    let sockets_before = open_sockets(pid);
    let addr: SocketAddr = c.addr.parse()?;
    let t0 = Instant::now();
    // Real peers keep getting through while the flood runs.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let d_addr = c.addr.clone();
    let legit = std::thread::spawn(move || -> Result<usize> {
        let mut n = 0;
        while done_rx.recv_timeout(Duration::from_millis(50)).is_err() {
            drop(welcomed(&d_addr, Role::Observer, "")?);
            n += 1;
        }
        Ok(n)
    });
    // A single client outruns the dispatcher's accept loop, so the kernel's accept queue
    // fills now and then and drops SYNs (retried after 1 s): such a connect is given up
    // after 300 ms and counted as turned away, which keeps the flood tight and bounded.
    let mut turned_away = 0usize;
    for _ in 0..FLOOD {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => drop(s),
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
                turned_away += 1
            }
            Err(e) => bail!("connect failed during the flood: {e}"),
        }
    }
    let took = t0.elapsed();
    let _ = done_tx.send(());
    let legit = legit.join().expect("legit client thread")?;
    let connected = FLOOD - turned_away;
    eprintln!(
        "{FLOOD} connect+close in {took:?}: {turned_away} turned away by a full accept queue; \
         {legit} real handshakes meanwhile"
    );
    assert!(legit >= 1, "no real handshake completed during the flood");
    assert!(
        connected >= FLOOD / 2,
        "only {connected} of {FLOOD} connects got through"
    );
    // Each connection is accounted for in the log (a handshake that saw the close, or one
    // turned away at the connection limit).
    wait_until("every flood connection to be logged", WAIT, || {
        let d = c.dispatcher();
        d.count(&["handshake failed; connection closed"]) + d.count(&["too many connections"])
            >= connected
    })?;
    assert!(
        c.dispatcher()
            .count(&["handshake failed", "connection closed by peer"])
            > 0
    );
    wait_sockets(pid, "the dispatcher's sockets to be released", |n| {
        n <= sockets_before + 2
    })?;
    dispatcher_alive(&mut c);
    drop(welcomed(&c.addr, Role::Runner, "")?);
    still_serves(&c, "after the flood")?;
    dispatcher_alive(&mut c);
    Ok(())
}

#[test]
fn bad_commit_ids_from_observers_and_runners_are_refused() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    tip_succeeds(&c)?;
    for bad in bad_commit_ids() {
        let before = reachable(&c, &bad);
        // An observer submitting it (after a good one: the whole Submit is refused).
        let mut r = welcomed(&c.addr, Role::Observer, "")?;
        r.send_msg(&FakeToDispatcher::Submit {
            commits: vec![GOOD_SHA.into(), bad.clone()],
            branch: None,
            front: false,
            rerun: false,
        })?;
        match r.recv::<FromDispatcher>()? {
            FromDispatcher::Error { reason } => {
                assert!(reason.contains("invalid commit id"), "{reason}")
            }
            other => panic!("Submit of {bad:?} answered with {other:?}"),
        }
        r.wait_closed(Duration::from_secs(3))?;
        c.dispatcher().wait_for(
            &[
                "WARN",
                &r.peer(),
                "connection closed on error",
                "role=observer",
                "invalid commit id",
            ],
            WAIT,
        )?;

        // A runner registering with a held job of that commit.
        let mut r = welcomed(&c.addr, Role::Runner, "")?;
        r.send_msg(&FakeToDispatcher::Register {
            addr: "127.0.0.1:1".into(),
            held: Some(FakeHeldJob {
                job: JobId::new(),
                commit: bad.clone(),
                finished: true,
            }),
            paused: None,
        })?;
        match r.recv::<FromDispatcher>()? {
            FromDispatcher::Error { reason } => {
                assert!(reason.contains("invalid commit id"), "{reason}")
            }
            other => panic!("Register holding {bad:?} answered with {other:?}"),
        }
        r.wait_closed(Duration::from_secs(3))?;
        c.dispatcher().wait_for(
            &[
                "WARN",
                &r.peer(),
                "connection closed on error",
                "role=runner",
                "invalid commit id",
            ],
            WAIT,
        )?;
        nothing_written_outside(&c, &bad, &before)?;
    }
    // The good commit that rode along was not queued, and no runner was registered.
    assert_eq!(c.dispatcher().count(&["queued", GOOD_SHA]), 0);
    assert_eq!(c.dispatcher().count(&["runner registered"]), 1);
    dispatcher_alive(&mut c);
    still_serves(&c, "after bad commit ids")?;
    Ok(())
}

/// Accepts one runner connection on a fake dispatcher and registers it; returns the
/// connection and the job the runner announced.
async fn fake_register(
    listener: &tokio::net::TcpListener,
    n: u64,
) -> Result<(Connection<tokio::net::TcpStream>, Option<HeldJob>)> {
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .context("the runner did not connect")??;
    let mut conn = Connection::new(stream);
    let role = conn.server_handshake(&[Role::Runner], None).await?;
    ensure!(role == Role::Runner);
    let held = match conn
        .recv_within::<ToDispatcher>(HANDSHAKE_TIMEOUT, "Register")
        .await?
    {
        ToDispatcher::Register { held, .. } => held,
        other => bail!("expected Register, got {other:?}"),
    };
    conn.send(&FromDispatcher::Registered {
        runner: RunnerId(n),
        held: None,
        // A fake that never pings: the runner must not give up on it mid-test.
        heartbeat_timeout: Duration::from_secs(600),
    })
    .await?;
    Ok((conn, held))
}

#[test]
fn runner_survives_an_assign_with_a_bad_commit_id() -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("tinyci-hostile-")
        .tempdir()?;
    let master = Master::from_fixture(&tmp.path().join("master"))?;
    let sha = master.commit(
        &format!("quick spec {}", unique()),
        &[(".tinyci.toml", &spec(&[("ok", "echo fine", "30s")]))],
    )?;
    let clone = master.clone_to(&tmp.path().join("runner_clone"))?;
    let rt = runtime();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_test_runner"));
    cmd.args(["--host", "127.0.0.1", "--port-range"])
        .arg(runner_port_range())
        .args(["--dispatcher-server", &addr])
        .arg(&clone)
        .env_remove("TINYCI_TOKEN");
    let mut runner = Proc::spawn("runner", cmd)?;
    runner.wait_for(&["listening", "addr="], WAIT)?;

    let bad = [
        "../../etc/passwd",
        "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    ];
    for (i, bad) in bad.iter().enumerate() {
        rt.block_on(async {
            let (mut conn, held) = fake_register(&listener, i as u64 + 1).await?;
            ensure!(held.is_none(), "runner announced {held:?}");
            conn.send(&FakeFromDispatcher::Assign {
                job: JobId::new(),
                commit: bad.to_string(),
            })
            .await?;
            // The runner drops this connection (it says nothing more on it).
            match conn
                .recv_within::<ToDispatcher>(WAIT, "the runner to hang up")
                .await
            {
                Err(tinyci::proto::ProtoError::Closed) | Err(tinyci::proto::ProtoError::Io(_)) => {
                    Ok(())
                }
                other => bail!("runner answered a bad Assign with {other:?}"),
            }
        })?;
        runner.wait_for_nth(
            &[
                "lost the dispatcher; reconnecting",
                "invalid commit id",
                bad,
            ],
            1,
            WAIT,
        )?;
        assert_alive(&mut runner);
    }
    assert!(!clone.join("../../etc/passwd").exists());

    // It comes back and does real work.
    let report = rt.block_on(async {
        let (mut conn, held) = fake_register(&listener, 9).await?;
        ensure!(held.is_none(), "runner announced {held:?}");
        let job = JobId::new();
        conn.send(&FromDispatcher::Assign {
            job,
            commit: CommitId::parse(&sha)?,
        })
        .await?;
        let mut output = Vec::new();
        loop {
            match conn
                .recv_within::<ToDispatcher>(WAIT, "the job's output")
                .await?
            {
                ToDispatcher::Log { job: j, data, .. } if j == job => {
                    output.extend_from_slice(&data)
                }
                ToDispatcher::Done { job: j, report, .. } if j == job => {
                    conn.send(&FromDispatcher::ResultAck {
                        job,
                        accepted: true,
                    })
                    .await?;
                    let text = String::from_utf8_lossy(&output).into_owned();
                    ensure!(text.contains("[ok] fine"), "{text}");
                    return Ok(report);
                }
                other => bail!("unexpected {other:?}"),
            }
        }
    })?;
    assert_eq!(report.status, RunStatus::Success, "{report:?}");
    runner.wait_for(&["result delivered"], WAIT)?;
    assert_alive(&mut runner);
    drop(runner);
    for pid in step_processes(&sha) {
        // SAFETY: kill(2) on a leftover of this test's own commit.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    Ok(())
}

#[test]
fn result_for_an_unknown_job_is_refused() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    // An empty queue, so nothing gets assigned to the fake runner.
    tip_succeeds(&c)?;
    let rt = runtime();
    let addr = c.addr.clone();
    let connect = |addr: String| async move {
        let stream = tokio::net::TcpStream::connect(&addr).await?;
        let mut conn = Connection::new(stream);
        conn.client_handshake(Role::Runner, "").await?;
        anyhow::Ok(conn)
    };

    // A Done for a job nobody ever assigned.
    let job = JobId::new();
    let conn = rt.block_on(async {
        let mut conn = connect(addr.clone()).await?;
        conn.send(&ToDispatcher::Register {
            addr: "127.0.0.1:1".into(),
            held: None,
            paused: None,
        })
        .await?;
        match conn
            .recv_within::<FromDispatcher>(WAIT, "Registered")
            .await?
        {
            FromDispatcher::Registered { held: None, .. } => {}
            other => bail!("expected Registered, got {other:?}"),
        }
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
        loop {
            match conn
                .recv_within::<FromDispatcher>(WAIT, "ResultAck")
                .await?
            {
                FromDispatcher::Ping { seq } => conn.send(&ToDispatcher::Pong { seq }).await?,
                FromDispatcher::ResultAck { job: j, accepted } => {
                    ensure!(j == job, "ack for {j}, not {job}");
                    ensure!(!accepted, "a result for an unknown job was accepted");
                    return Ok(conn);
                }
                other => bail!("unexpected {other:?}"),
            }
        }
    })?;
    c.dispatcher()
        .wait_for(&["superseded attempt refused", &job.to_string()], WAIT)?;

    // Registering with a held job the dispatcher never handed out.
    let held_job = JobId::new();
    let conn2 = rt.block_on(async {
        let mut conn = connect(addr.clone()).await?;
        conn.send(&ToDispatcher::Register {
            addr: "127.0.0.1:2".into(),
            held: Some(HeldJob {
                job: held_job,
                commit: CommitId::parse(GOOD_SHA)?,
                finished: true,
            }),
            paused: None,
        })
        .await?;
        match conn
            .recv_within::<FromDispatcher>(WAIT, "Registered")
            .await?
        {
            FromDispatcher::Registered {
                held: Some(HeldVerdict::Drop { reason }),
                ..
            } => ensure!(reason.contains("not outstanding"), "{reason}"),
            other => bail!("expected Registered with Drop, got {other:?}"),
        }
        Ok(conn)
    })?;
    c.dispatcher().wait_for(
        &[
            "superseded attempt refused",
            &held_job.to_string(),
            GOOD_SHA,
        ],
        WAIT,
    )?;

    // Take the fake runners out of the pool before real work arrives.
    drop((conn, conn2));
    c.dispatcher().wait_for_nth(&["runner left"], 2, WAIT)?;
    assert!(!c.json_path(GOOD_SHA).exists());
    dispatcher_alive(&mut c);
    still_serves(&c, "after an unknown result")?;
    Ok(())
}

#[test]
fn malformed_tinyci_toml_is_an_error_result_and_the_next_commit_runs() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    tip_succeeds(&c)?;
    let sha = c.commit(
        "broken spec",
        &[(".tinyci.toml", "[[steps]\nname = \"broken\nrun = ")],
    )?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "error", "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("malformed"), "{r}");
    assert!(error.contains(".tinyci.toml"), "{r}");
    let log = c.log_text(&sha);
    assert!(
        log.contains("[tinyci] error: malformed .tinyci.toml"),
        "{log}"
    );
    assert_alive(&mut c.runners[0]);
    dispatcher_alive(&mut c);
    still_serves(&c, "fixed spec")?;
    Ok(())
}

#[test]
fn a_gigabyte_of_output_is_capped_in_bounded_memory() -> Result<()> {
    // The flood keeps both cores busy for seconds; the harness's 1 s heartbeat timeout then
    // can expire between two pongs (seen in CI), which is not what this test is about.
    let mut c = Cluster::start(
        bins(),
        Opts {
            heartbeat_timeout: "5s",
            ..Opts::default()
        },
    )?;
    tip_succeeds(&c)?;
    let toml = spec(&[
        (
            "flood",
            "head -c 1073741824 /dev/zero | tr '\\0' 'x'; echo; echo flood done",
            "2m",
        ),
        ("after", "echo after the flood", "30s"),
    ]);
    let sha = c.commit("a gigabyte of output", &[(".tinyci.toml", &toml)])?;
    let t0 = Instant::now();
    let r = c.wait_result(&sha, Duration::from_secs(90))?;
    let took = t0.elapsed();
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        steps(&r),
        vec![
            ("flood".into(), "success".into()),
            ("after".into(), "success".into())
        ]
    );
    let cap = 16u64 << 20;
    let len = std::fs::metadata(c.results.join(format!("{sha}.log")))?.len();
    assert!(len <= cap + (64 << 10), "log is {len} bytes");
    assert!(len >= cap / 2, "log is only {len} bytes");
    let log = std::fs::read(c.results.join(format!("{sha}.log")))?;
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("[tinyci] output truncated"),
        "no truncation marker"
    );
    let runner_hwm = proc_status_bytes(c.runners[0].pid(), "VmHWM")?;
    let dispatcher_hwm = proc_status_bytes(c.dispatcher().pid(), "VmHWM")?;
    eprintln!(
        "1 GiB step: result in {took:?}; log {len} bytes; peak RSS runner {} MiB, dispatcher {} MiB",
        runner_hwm >> 20,
        dispatcher_hwm >> 20
    );
    assert!(runner_hwm < 200 << 20, "runner peak RSS {runner_hwm} bytes");
    assert!(
        dispatcher_hwm < 200 << 20,
        "dispatcher peak RSS {dispatcher_hwm} bytes"
    );
    assert_alive(&mut c.runners[0]);
    dispatcher_alive(&mut c);
    still_serves(&c, "after the flood of output")?;
    Ok(())
}

#[test]
fn daemons_forked_by_a_step_do_not_outlive_it() -> Result<()> {
    let mut c = Cluster::start(bins(), Opts::default())?;
    tip_succeeds(&c)?;
    let toml = spec(&[
        (
            "background",
            "sleep 300 & echo left a background job",
            "30s",
        ),
        (
            "nohup",
            "nohup sleep 301 >/dev/null 2>&1 & echo left a nohup daemon",
            "30s",
        ),
        ("subshell", "(sleep 302 &); echo left a double fork", "30s"),
    ]);
    let sha = c.commit("daemons", &[(".tinyci.toml", &toml)])?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    for (i, (name, status)) in steps(&r).into_iter().enumerate() {
        assert_eq!(status, "success", "{name}: {r}");
        let ms = r["steps"][i]["duration_ms"].as_u64().unwrap_or(u64::MAX);
        assert!(ms < 10_000, "step {name} waited for its daemon: {ms} ms");
    }
    let log = c.log_text(&sha);
    for line in [
        "[background] left a background job",
        "[nohup] left a nohup daemon",
        "[subshell] left a double fork",
    ] {
        assert!(log.contains(line), "{log}");
    }
    wait_until(
        "the steps' daemons to be gone",
        Duration::from_secs(10),
        || step_processes(&sha).is_empty(),
    )?;
    assert_alive(&mut c.runners[0]);
    still_serves(&c, "after daemons")?;
    Ok(())
}

#[test]
fn token_is_required_when_set() -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            token: Some("s3cret".into()),
            ..Opts::default()
        },
    )?;
    // With the token everything works end to end.
    tip_succeeds(&c)?;
    let handshake_failures = |c: &Cluster| {
        c.dispatcher().count(&[
            "handshake failed; connection closed",
            "missing or wrong token",
        ])
    };

    // A raw client with a wrong, and with no, token.
    for token in ["wrong", "", "s3cre", "s3cret "] {
        let (reason, r) = refused_hello(&c, &good_hello(Role::Observer, token))?;
        assert!(
            reason.contains("missing or wrong token"),
            "{token:?}: {reason}"
        );
        c.dispatcher().wait_for(
            &["handshake failed; connection closed", &r.peer(), "token"],
            WAIT,
        )?;
    }

    // A runner and an observer started without the token are refused, say why, and stop
    // (retrying cannot help: tests/hygiene.rs checks the exit code and message).
    for (name, program, args) in [
        (
            "tokenless_runner",
            &c.bins.runner,
            vec!["--host", "127.0.0.1", "--port-range"],
        ),
        (
            "tokenless_observer",
            &c.bins.observer,
            vec!["--poll-interval", "100ms"],
        ),
    ] {
        let before = handshake_failures(&c);
        let clone = c.master.clone_to(&c.tmp.path().join(name))?;
        let mut cmd = Command::new(program);
        cmd.args(&args);
        if name == "tokenless_runner" {
            cmd.arg(runner_port_range());
        }
        cmd.args(["--dispatcher-server", &c.addr])
            .arg(&clone)
            .env_remove("TINYCI_TOKEN");
        let mut p = Proc::spawn(name, cmd)?;
        p.wait_for(&["error:", "refused our hello", "token"], WAIT)?;
        wait_until("the dispatcher to log the bad token", WAIT, || {
            handshake_failures(&c) > before
        })?;
        wait_until("the tokenless peer to stop", WAIT, || !p.is_running())?;
        assert_eq!(p.count(&["running"]), 0);
    }

    assert_eq!(c.dispatcher().count(&["runner registered"]), 1);
    dispatcher_alive(&mut c);
    // The tokened cluster still works.
    still_serves(&c, "with tokenless peers knocking")?;
    Ok(())
}
