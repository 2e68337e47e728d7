//! Networking shared by the roles: connecting with a handshake, binding in a port range,
//! reconnect backoff and the shared-secret token.

use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use tinyci_proto::{Connection, ProtoError, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// What a connection loop runs over: a [`TcpStream`] in the binaries (tuned by
/// [`tune_stream`] before it is handed over), an in-memory `tokio::io::duplex` pipe in the
/// loops' tests, where time can be paused.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// How long a TCP connect may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP keepalive on every long-lived connection: the first probe after this much idle
/// time…
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// …then one every this often…
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// …and the kernel drops the connection after this many unanswered probes. So a peer whose
/// host vanished is noticed within about 25 s even on a connection with nothing to say
/// (an observer's between polls); the heartbeat read deadlines notice sooner where there
/// is traffic, and also catch what keepalive cannot: a middlebox that answers probes but
/// forwards nothing.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// Data written but not acknowledged for this long fails the connection (TCP_USER_TIMEOUT).
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Turns on TCP keepalive (see [`KEEPALIVE_IDLE`]) and the unacknowledged-data timeout on a
/// connected socket, and disables Nagle (small frames such as pings must not wait). Best
/// effort: a socket that refuses an option still works, so failures are only logged.
pub fn tune_stream(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Errors from connecting to or binding for a peer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where we tried to connect.
        addr: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The TCP connection took too long.
    #[error("cannot connect to {0}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(String),
    /// The handshake failed or was refused.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The peer.
        addr: String,
        /// Why.
        source: ProtoError,
    },
    /// No port in the range could be bound.
    #[error("no free port in {host}:{lo}-{hi} (last error: {last})")]
    NoFreePort {
        /// Host we bound on.
        host: String,
        /// Range start.
        lo: u16,
        /// Range end.
        hi: u16,
        /// The last bind error.
        last: std::io::Error,
    },
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token file or `TINYCI_TOKEN` is empty: authentication would silently be off.
    #[error("{0} is empty; put the shared secret in it, or do not set it to run without a token")]
    EmptyToken(String),
}

impl NetError {
    /// Whether retrying cannot help: the peer refused our hello (token, version, role), it
    /// is not a tinyci server, or our own token setting is unusable. Connection failures
    /// and timeouts are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            NetError::Handshake { source, .. } => source.is_permanent(),
            NetError::TokenFile { .. } | NetError::EmptyToken(_) => true,
            NetError::Connect { .. }
            | NetError::ConnectTimeout(_)
            | NetError::NoFreePort { .. } => false,
        }
    }
}

/// Checks that `s` is `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6 address,
/// and a port from 1 to 65535): a peer address given on the command line. Whether the
/// name resolves is not checked here — a name that does not resolve yet (a container
/// that has not started) is worth retrying.
pub fn parse_peer_addr(s: &str) -> Result<String, String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port: write HOST:PORT, e.g. {s}:8888"));
    };
    if host.is_empty() {
        return Err(format!(
            "{s:?} has no host: write HOST:PORT, e.g. localhost{s}"
        ));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{s:?}: write an IPv6 address in brackets, e.g. [::1]:8888"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: {port:?} is not a port (1-65535)")),
    }
}

/// Connects to `addr`, says hello as `role` with `token`, and returns the ready connection.
pub async fn connect(
    addr: &str,
    role: Role,
    token: &str,
) -> Result<Connection<TcpStream>, NetError> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(NetError::Connect {
                addr: addr.to_owned(),
                source,
            })
        }
        Err(_) => return Err(NetError::ConnectTimeout(addr.to_owned())),
    };
    tune_stream(&stream);
    let mut conn = Connection::new(stream);
    conn.client_handshake(role, token)
        .await
        .map_err(|source| NetError::Handshake {
            addr: addr.to_owned(),
            source,
        })?;
    Ok(conn)
}

/// Binds the first free port of `ports` on `host`.
pub async fn bind_in_range(
    host: &str,
    ports: RangeInclusive<u16>,
) -> Result<TcpListener, NetError> {
    let (lo, hi) = (*ports.start(), *ports.end());
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty port range");
    for port in ports {
        match TcpListener::bind((host, port)).await {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(NetError::NoFreePort {
        host: host.to_owned(),
        lo,
        hi,
        last,
    })
}

/// Parses `LO-HI` (or a single port) into an inclusive range.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    let lo: u16 = lo
        .parse()
        .map_err(|_| format!("bad port {lo:?} in {s:?}"))?;
    let hi: u16 = hi
        .parse()
        .map_err(|_| format!("bad port {hi:?} in {s:?}"))?;
    if lo > hi {
        return Err(format!("empty port range {s:?}"));
    }
    Ok(lo..=hi)
}

/// The environment variable that holds the shared secret when no `--token-file` is given.
pub const TOKEN_ENV: &str = "TINYCI_TOKEN";

/// The shared secret: `--token-file` if given, else `TINYCI_TOKEN`, else none. An empty
/// (or blank) file or variable, and an unreadable file, are errors: either would otherwise
/// turn authentication off without a word.
pub fn load_token(token_file: Option<&Path>) -> Result<Option<String>, NetError> {
    load_token_from(token_file, std::env::var_os(TOKEN_ENV))
}

fn load_token_from(
    token_file: Option<&Path>,
    env: Option<std::ffi::OsString>,
) -> Result<Option<String>, NetError> {
    if let Some(path) = token_file {
        let bad = |source| NetError::TokenFile {
            path: path.display().to_string(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(bad)?;
        let t = text.trim();
        if t.is_empty() {
            return Err(NetError::EmptyToken(format!(
                "token file {}",
                path.display()
            )));
        }
        return Ok(Some(t.to_owned()));
    }
    let Some(value) = env else {
        return Ok(None);
    };
    let value = value.into_string().map_err(|_| NetError::TokenFile {
        path: format!("${TOKEN_ENV}"),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8"),
    })?;
    let t = value.trim();
    if t.is_empty() {
        return Err(NetError::EmptyToken(format!("${TOKEN_ENV}")));
    }
    Ok(Some(t.to_owned()))
}

/// Exponential backoff between reconnect attempts, with a little jitter so a pool of
/// runners does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now; the following one will be longer.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Up to +25% jitter.
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("8900-9000").unwrap(), 8900..=9000);
        assert_eq!(parse_port_range("7").unwrap(), 7..=7);
        assert!(parse_port_range("9-8").is_err());
        assert!(parse_port_range("a-8").is_err());
    }

    #[tokio::test]
    async fn tuned_streams_have_keepalive_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, (server, _)) = (client.unwrap(), server.unwrap());
        for s in [&client, &server] {
            tune_stream(s);
            let sock = socket2::SockRef::from(s);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
            assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
            assert!(s.nodelay().unwrap());
        }
    }

    #[test]
    fn peer_addresses_need_a_host_and_a_port() {
        for good in [
            "localhost:8888",
            "127.0.0.1:1",
            "[::1]:8888",
            "ci.example.com:65535",
        ] {
            assert_eq!(parse_peer_addr(good).as_deref(), Ok(good));
        }
        let e = parse_peer_addr("localhost").unwrap_err();
        assert!(e.contains("no port") && e.contains("localhost:8888"), "{e}");
        for bad in [
            ":8888",
            "localhost:",
            "localhost:0",
            "localhost:99999",
            "::1:8888",
            "h:p",
        ] {
            assert!(parse_peer_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_or_unreadable_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  s3cret\n").unwrap();
        assert_eq!(
            load_token_from(Some(&file), Some("ignored".into())).unwrap(),
            Some("s3cret".into())
        );
        std::fs::write(&file, " \n").unwrap();
        let e = load_token_from(Some(&file), None).unwrap_err();
        assert!(
            matches!(e, NetError::EmptyToken(_)) && e.is_permanent(),
            "{e}"
        );
        assert!(e.to_string().contains("is empty"), "{e}");
        let missing = dir.path().join("missing");
        let e = load_token_from(Some(&missing), None).unwrap_err();
        assert!(matches!(e, NetError::TokenFile { .. }), "{e}");
        let e = load_token_from(None, Some("".into())).unwrap_err();
        assert!(e.to_string().contains("$TINYCI_TOKEN is empty"), "{e}");
        assert_eq!(load_token_from(None, None).unwrap(), None);
        assert_eq!(
            load_token_from(None, Some(" t ".into())).unwrap(),
            Some("t".into())
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(125));
        assert!(d[4] >= Duration::from_millis(400) && d[4] <= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
