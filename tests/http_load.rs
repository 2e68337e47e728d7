//! The HTTP server under hostile load, against the real binaries: a thousand idle event
//! streams, a client that asks for a big log and never reads it, and connections past the
//! cap. Each costs only its own connection: `/runs` and `/metrics` stay fast, the idle
//! streams still get their events, the reader that never reads is cut at the idle timeout.

mod http_common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use http_common::*;
use testkit::*;

/// Idle streams held open at once.
const IDLE_STREAMS: usize = 1000;

/// Opens a connection and sends `GET path`, reading nothing.
fn raw_get(addr: SocketAddr, path: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n").as_bytes(),
    )?;
    Ok(s)
}

/// Reads from `s` until `needle` has been seen (bounded by `within`).
fn read_until(s: &mut TcpStream, needle: &str, within: Duration) -> Result<String> {
    s.set_read_timeout(Some(within))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    while !String::from_utf8_lossy(&got).contains(needle) {
        if Instant::now() > deadline {
            bail!(
                "{needle:?} not seen within {within:?}; got {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!(
                "closed before {needle:?}; got {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// How long one GET takes, failing unless it answers 200.
fn timed_get(w: &Web, path: &str) -> Result<Duration> {
    let t = Instant::now();
    let r = w.http.get(w.url(path)).send()?;
    if !r.status().is_success() {
        bail!("GET {path}: {}", r.status());
    }
    r.bytes()?;
    Ok(t.elapsed())
}

#[test]
fn idle_streams_a_reader_that_never_reads_and_excess_connections_cost_only_themselves() -> Result<()>
{
    let idle_timeout = Duration::from_secs(2);
    let w = start(
        testkit::bins!(),
        Opts {
            observer: false,
            ..Opts::default()
        },
        &[
            "--http-idle-timeout",
            "2s",
            "--http-max-connections",
            &(IDLE_STREAMS + 20).to_string(),
        ],
    )?;
    let addr: SocketAddr = w.base.trim_start_matches("http://").parse()?;

    // A run with a log bigger than any socket buffers in between (about 12 MB).
    let big = w.c.commit(
        "big log",
        &[(
            ".tinyci.toml",
            &spec(&[(
                "flood",
                "yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz01234567 | head -n 140000",
                "60s",
            )]),
        )],
    )?;
    w.submit(&big)?;
    let run = w.wait_status(&big, "success")?;
    let log_len = run["log_bytes"].as_u64().context("log_bytes")?;
    assert!(log_len > 10_000_000, "{log_len}");

    // The reader that never reads, with a tiny receive buffer.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_recv_buffer_size(4096)?;
    sock.connect_timeout(&addr.into(), WAIT)?;
    let mut stuck: TcpStream = sock.into();
    stuck.write_all(format!("GET /run/{big}/log HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())?;
    let stuck_since = Instant::now();

    // A thousand idle event streams, each answered with its headers.
    let mut idle = Vec::with_capacity(IDLE_STREAMS);
    for _ in 0..IDLE_STREAMS {
        idle.push(raw_get(addr, "/events")?);
    }
    for s in idle.iter_mut().step_by(50) {
        read_until(s, "text/event-stream", WAIT)?;
    }

    // The rest of the server does not notice.
    for path in ["/runs?limit=50", "/metrics", "/queue"] {
        let took = timed_get(&w, path)?;
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
    }

    // Past the cap, connections are closed at once, and the server still answers.
    // (Kept open, so each holds its place.)
    let mut refused = 0;
    let mut extra = Vec::new();
    for _ in 0..30 {
        let mut s = raw_get(addr, "/queue")?;
        s.set_read_timeout(Some(WAIT))?;
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) | Err(_) => refused += 1,
            Ok(_) => {}
        }
        extra.push(s);
    }
    assert!(
        refused >= 10,
        "only {refused} connections past the cap were refused"
    );
    drop(extra);
    // Their places come back once they are gone.
    wait_until("the server answering again", WAIT, || {
        timed_get(&w, "/runs?limit=1").is_ok()
    })?;

    // The idle streams still hear of a new run (after the idle timeout passed: their
    // keep-alives kept them open).
    let deadline = stuck_since + idle_timeout + Duration::from_millis(500);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let next = w.c.commit("after", &[])?;
    w.submit(&next)?;
    for s in idle.iter_mut().step_by(97) {
        read_until(s, &next, WAIT)?;
    }

    // The reader that never read was cut: what it can still read ends well short of the
    // log, with the connection closed.
    stuck.set_read_timeout(Some(WAIT))?;
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stuck.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                bail!("the stuck reader's connection was not closed: {e} after {total} bytes")
            }
        }
    }
    assert!(
        (total as u64) < log_len,
        "the never-reading client got the whole log ({total} bytes): nothing cut it"
    );
    Ok(())
}
