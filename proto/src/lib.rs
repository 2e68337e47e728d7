//! The tinyci wire protocol: messages, ids, framing and the handshake.
//!
//! Every connection carries length-delimited frames (a 4-byte big-endian length, at most
//! [`MAX_FRAME_LEN`]), each holding one bincode-encoded message. Only this crate knows the
//! encoding; everything else sends and receives typed messages through [`Connection`].
//!
//! # The conversation
//!
//! | when | sender → receiver | message | answer |
//! |---|---|---|---|
//! | first frame, every connection | connecting side → accepting side | [`Hello`] | [`HelloReply`] (`Welcome` or `Refused`, then close) |
//! | observer has new commits | observer → dispatcher | [`ToDispatcher::Submit`] | [`FromDispatcher::Submitted`] after the commits are durably recorded |
//! | runner connected | runner → dispatcher | [`ToDispatcher::Register`] (held job, paused?) | [`FromDispatcher::Registered`] (with a verdict on a held job, and the heartbeat timeout) |
//! | every heartbeat interval | dispatcher → runner | [`FromDispatcher::Ping`] | [`ToDispatcher::Pong`] |
//! | a runner heard nothing for the heartbeat timeout | runner | (closes, connects again) | |
//! | a runner is free and a commit waits | dispatcher → runner | [`FromDispatcher::Assign`] | `Log`… then `Done` |
//! | output was produced | runner → dispatcher | [`ToDispatcher::Log`] | none |
//! | the job ended | runner → dispatcher | [`ToDispatcher::Done`] | [`FromDispatcher::ResultAck`] |
//! | the job failed on infrastructure, or was stopped | runner → dispatcher | [`ToDispatcher::GiveBack`] | none (the commit goes back to the front of the queue; no result) |
//! | origin unreachable / draining | runner → dispatcher | [`ToDispatcher::Pause`], later [`ToDispatcher::Resume`] | none |
//! | runner stops on purpose | runner → dispatcher | [`ToDispatcher::Goodbye`], then close | none (a held job goes back uncounted) |
//! | dispatcher stops on purpose | dispatcher → runner | [`FromDispatcher::ShuttingDown`], then close | none (the runner keeps its job and reconnects at once) |
//! | a client asks a runner | client → runner | [`ToRunner::Status`] | [`FromRunner::Status`] |
//! | a client asks the dispatcher | client → dispatcher | [`ToDispatcher::Status`], [`ToDispatcher::Runs`], [`ToDispatcher::Run`], [`ToDispatcher::Why`] | [`FromDispatcher::Status`], [`FromDispatcher::Runs`], [`FromDispatcher::Run`], [`FromDispatcher::Why`] (or [`FromDispatcher::NotFound`] / [`FromDispatcher::Ambiguous`]) |
//! | a client submits | client → dispatcher | [`ToDispatcher::Submit`] (branch, front, rerun) | [`FromDispatcher::Submitted`] |
//! | a client follows a log | client → dispatcher | [`ToDispatcher::FollowLog`] | [`FromDispatcher::LogData`]…, then [`FromDispatcher::LogEnd`] |
//! | a client cancels | client → dispatcher | [`ToDispatcher::Cancel`] | [`FromDispatcher::Cancelled`]; a running attempt's runner gets [`FromDispatcher::Cancel`] and answers with its `Done` (status `cancelled`) |
//! | a peer broke the protocol | either | [`FromDispatcher::Error`] | none; close |

mod ids;
mod messages;

use std::io;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

pub use ids::{CommitId, InvalidCommitId, JobId, RunnerId};
pub use messages::{
    AttemptView, DispatcherStatus, FromDispatcher, FromRunner, GiveBackCause, HeldJob, HeldVerdict,
    Hello, HelloReply, QueuedView, Role, RunDetail, RunQuery, RunReport, RunState, RunStatus,
    RunSummary, RunnerState, RunnerView, StepReport, StepStatus, ToDispatcher, ToRunner,
};

/// The first four bytes of every hello: ASCII `tCI1`.
pub const MAGIC: u32 = 0x7443_4931;

/// Bumped on every change to a message after the hello.
pub const PROTOCOL_VERSION: u32 = 4;

/// The largest frame either side sends or accepts (the length prefix is checked before any
/// byte of the body is buffered).
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// How long the accepting side waits for a hello, and the connecting side for the reply.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one frame may take to be written before the peer is considered stuck.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
    /// A length prefix announced more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame longer than the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The peer closed the connection where a frame was required.
    #[error("connection closed by peer")]
    Closed,
    /// A frame's body is not a valid message of the expected kind.
    #[error("malformed message: {0}")]
    Decode(String),
    /// A message could not be encoded (too large for a frame, typically).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The peer did not answer in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The hello did not start with [`MAGIC`]: not a tinyci peer.
    #[error("not a tinyci peer (magic {0:#010x})")]
    BadMagic(u32),
    /// The peers speak different protocol versions.
    #[error("protocol version mismatch: ours is {ours}, the peer's is {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The hello named a role this side does not know.
    #[error("unknown role code {0}")]
    UnknownRole(u8),
    /// The hello named a role this side does not serve.
    #[error("role {0} is not served here")]
    WrongRole(Role),
    /// The hello carried no token or the wrong one.
    #[error("missing or wrong token (set TINYCI_TOKEN or --token-file to the dispatcher's)")]
    BadToken,
    /// The peer sent a well-formed message that is wrong at this point of the conversation.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// The peer ended the conversation with an error frame after the handshake.
    #[error("refused by peer: {0}")]
    Refused(String),
    /// The other side refused our hello. A hello is only ever refused for something that
    /// will not change by retrying (version, role, token), so this is permanent.
    #[error("the peer refused our hello: {0}")]
    HelloRefused(String),
    /// The peer answered our hello with something that is not a tinyci hello reply: it is
    /// some other kind of server (HTTP, SSH…).
    #[error("the peer is not a tinyci server (it answered {0})")]
    NotTinyci(String),
}

impl ProtoError {
    /// Whether retrying cannot help: the peer refused our hello, or is not a tinyci peer at
    /// all. Everything else (a closed or slow connection, a bad frame mid-conversation) may
    /// be over on the next connection.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ProtoError::HelloRefused(_)
                | ProtoError::NotTinyci(_)
                | ProtoError::VersionMismatch { .. }
                | ProtoError::BadMagic(_)
        )
    }
}

/// What the accepting side learned from a hello it welcomed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// The peer's role.
    pub role: Role,
    /// Whether the hello carried a token (worth a warning when this side expects none).
    pub presented_token: bool,
}

/// Shows the first bytes a peer sent, printable where they are text (`"HTTP/1.1 400 …"`).
fn show_first_bytes(bytes: &[u8]) -> String {
    const SHOWN: usize = 40;
    if bytes.is_empty() {
        return "with an unreadable frame".into();
    }
    let head = &bytes[..bytes.len().min(SHOWN)];
    let text: String = head.escape_ascii().to_string();
    let more = if bytes.len() > SHOWN { "…" } else { "" };
    format!("\"{text}{more}\"")
}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        // The codec reports protocol violations as `InvalidData` i/o errors; give them names.
        if e.kind() == io::ErrorKind::InvalidData {
            if let Some(inner) = e.get_ref() {
                if inner.is::<tokio_util::codec::LengthDelimitedCodecError>() {
                    return ProtoError::FrameTooLarge;
                }
            }
        }
        if e.kind() == io::ErrorKind::Other && e.to_string().contains("bytes remaining on stream") {
            return ProtoError::Truncated;
        }
        ProtoError::Io(e)
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Encodes one message as a frame body.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, ProtoError> {
    let body = bincode::serde::encode_to_vec(msg, bincode_config())
        .map_err(|e| ProtoError::Encode(e.to_string()))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtoError::Encode(format!(
            "{} bytes exceed the frame limit",
            body.len()
        )));
    }
    Ok(body)
}

/// Decodes one frame body as a message; trailing bytes are an error.
pub fn decode<M: DeserializeOwned>(body: &[u8]) -> Result<M, ProtoError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(ProtoError::Decode(format!(
            "{} unexpected trailing bytes",
            body.len() - used
        )));
    }
    Ok(msg)
}

/// The length-delimited codec every connection uses.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the compiler from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// One framed connection: the only code that turns bytes into messages and back.
pub struct Connection<S> {
    framed: Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        Connection {
            framed: Framed::new(stream, codec()),
        }
    }

    /// Sends one message, failing if the peer does not take it within [`SEND_TIMEOUT`].
    pub async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), ProtoError> {
        let body = Bytes::from(encode(msg)?);
        match tokio::time::timeout(SEND_TIMEOUT, self.framed.send(body)).await {
            Ok(res) => res.map_err(ProtoError::from),
            Err(_) => Err(ProtoError::Timeout(SEND_TIMEOUT, "the peer to read")),
        }
    }

    /// Sends several messages with one flush (one write for what fits the buffer), failing
    /// if the peer does not take them within [`SEND_TIMEOUT`].
    pub async fn send_all<M: Serialize>(&mut self, msgs: &[M]) -> Result<(), ProtoError> {
        let bodies = msgs
            .iter()
            .map(|m| encode(m).map(Bytes::from))
            .collect::<Result<Vec<_>, _>>()?;
        let send = async {
            for body in bodies {
                self.framed.feed(body).await?;
            }
            SinkExt::<Bytes>::flush(&mut self.framed).await
        };
        match tokio::time::timeout(SEND_TIMEOUT, send).await {
            Ok(res) => res.map_err(ProtoError::from),
            Err(_) => Err(ProtoError::Timeout(SEND_TIMEOUT, "the peer to read")),
        }
    }

    /// Receives one message; `Ok(None)` when the peer closed cleanly between frames.
    ///
    /// Cancel-safe: a partly received frame stays buffered for the next call, so this can
    /// sit in a `select!` loop.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtoError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(body)) => decode(&body).map(Some),
        }
    }

    /// Receives one message within `limit`; a clean close is [`ProtoError::Closed`].
    pub async fn recv_within<M: DeserializeOwned>(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<M, ProtoError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(ProtoError::Closed),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProtoError::Timeout(limit, what)),
        }
    }

    /// The connecting side's handshake: send our hello, wait for the welcome.
    pub async fn client_handshake(&mut self, role: Role, token: &str) -> Result<(), ProtoError> {
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role: role.code(),
            token: token.to_owned(),
        };
        self.send(&hello).await?;
        match self.recv_within(HANDSHAKE_TIMEOUT, "the hello reply").await {
            Ok(HelloReply::Welcome { .. }) => Ok(()),
            Ok(HelloReply::Refused { reason }) => Err(ProtoError::HelloRefused(reason)),
            // A tinyci peer of any version answers with a well-formed reply (its layout is
            // frozen), so anything else is another kind of server. Its bytes are still in
            // the read buffer when the length prefix was absurd (the usual case: text).
            Err(ProtoError::FrameTooLarge | ProtoError::Decode(_)) => Err(ProtoError::NotTinyci(
                show_first_bytes(self.framed.read_buffer()),
            )),
            Err(e) => Err(e),
        }
    }

    /// The accepting side's handshake: read the hello within [`HANDSHAKE_TIMEOUT`], check
    /// magic, version, role and token, and answer. On refusal the peer is sent the reason
    /// (best effort) and the error is returned for our own log.
    pub async fn server_handshake(
        &mut self,
        served: &[Role],
        token: Option<&str>,
    ) -> Result<Role, ProtoError> {
        self.accept_hello(served, token).await.map(|g| g.role)
    }

    /// [`Connection::server_handshake`], also saying whether the peer presented a token.
    pub async fn accept_hello(
        &mut self,
        served: &[Role],
        token: Option<&str>,
    ) -> Result<Greeting, ProtoError> {
        let verdict = match self
            .recv_within::<Hello>(HANDSHAKE_TIMEOUT, "the hello")
            .await
        {
            Ok(hello) => check_hello(&hello, served, token).map(|role| Greeting {
                role,
                presented_token: !hello.token.is_empty(),
            }),
            Err(e @ (ProtoError::Decode(_) | ProtoError::FrameTooLarge)) => Err(e),
            // Nothing readable arrived, so there is nobody to explain anything to.
            Err(e) => return Err(e),
        };
        match verdict {
            Ok(greeting) => {
                self.send(&HelloReply::Welcome {
                    version: PROTOCOL_VERSION,
                })
                .await?;
                Ok(greeting)
            }
            Err(e) => {
                let reason = e.to_string();
                let _ = self.send(&HelloReply::Refused { reason }).await;
                Err(e)
            }
        }
    }

    /// The underlying stream (for peer addresses and the like).
    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }
}

fn check_hello(hello: &Hello, served: &[Role], token: Option<&str>) -> Result<Role, ProtoError> {
    if hello.magic != MAGIC {
        return Err(ProtoError::BadMagic(hello.magic));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err(ProtoError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: hello.version,
        });
    }
    let role = Role::from_code(hello.role).ok_or(ProtoError::UnknownRole(hello.role))?;
    if !served.contains(&role) {
        return Err(ProtoError::WrongRole(role));
    }
    if let Some(expected) = token {
        if !constant_time_eq(expected.as_bytes(), hello.token.as_bytes()) {
            return Err(ProtoError::BadToken);
        }
    }
    Ok(role)
}
