//! The client side of the dispatcher's `Client` role: what `tinyci` (and the git hooks,
//! the tests and the benchmark) use to ask the dispatcher what it is doing, submit,
//! cancel and follow logs.
//!
//! [`Client`] is one connection with typed requests; [`follow_log`] keeps a log follow
//! going across dispatcher restarts (it reconnects and resumes at its byte offset, so no
//! byte is shown twice). The command-line front end is [`cli`].

pub mod cli;
pub mod hook;

use std::time::Duration;

use tinyci_proto::{
    CommitId, Connection, DispatcherStatus, FromDispatcher, ProtoError, Role, RunDetail, RunQuery,
    RunState, RunSummary, ToDispatcher,
};
use tokio::net::TcpStream;

use crate::net::{self, Backoff, NetError};

/// How long the dispatcher gets to answer one request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The dispatcher could not be reached or refused us.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The connection broke or the dispatcher did not answer in time.
    #[error("talking to the dispatcher: {0}")]
    Proto(#[from] ProtoError),
    /// No commit known to the dispatcher matches.
    #[error("unknown commit: {0}")]
    NotFound(String),
    /// The prefix matches several commits.
    #[error("{prefix} is ambiguous: it matches {}", list(.candidates))]
    Ambiguous {
        /// What was asked.
        prefix: String,
        /// Some of the matches.
        candidates: Vec<CommitId>,
    },
    /// The dispatcher refused the request (it cannot record submissions now, say).
    #[error("the dispatcher refused: {0}")]
    Refused(String),
    /// The request took effect, but the dispatcher's database could not record it yet: it
    /// is recorded when the database works again, or forgotten if the dispatcher stops
    /// first. Sending it again is safe.
    #[error("the dispatcher took the request but could not record it yet: {0}; it is recorded once its database works again, and forgotten if the dispatcher stops before that (sending it again is safe)")]
    NotRecorded(String),
}

fn list(c: &[CommitId]) -> String {
    c.iter()
        .map(|c| c.short().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ClientError {
    /// Whether the dispatcher could not be reached at all (connection refused, timed out,
    /// broken before an answer) rather than answering something.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Net(n) => !n.is_permanent(),
            ClientError::Proto(p) => !p.is_permanent(),
            _ => false,
        }
    }
}

/// One connection to the dispatcher in the `Client` role.
pub struct Client {
    conn: Connection<TcpStream>,
}

/// Turns an answer that is not the one expected into an error.
fn unexpected(answer: FromDispatcher) -> ClientError {
    match answer {
        FromDispatcher::NotFound { what } => ClientError::NotFound(what),
        FromDispatcher::Ambiguous { candidates } => ClientError::Ambiguous {
            prefix: String::new(),
            candidates,
        },
        FromDispatcher::Error { reason } => ClientError::Refused(reason),
        FromDispatcher::NotRecorded { reason } => ClientError::NotRecorded(reason),
        other => ClientError::Proto(ProtoError::Violation(format!(
            "unexpected answer {}",
            variant_name(&other)
        ))),
    }
}

fn variant_name(m: &FromDispatcher) -> &'static str {
    match m {
        FromDispatcher::Submitted { .. } => "Submitted",
        FromDispatcher::Registered { .. } => "Registered",
        FromDispatcher::Assign { .. } => "Assign",
        FromDispatcher::Ping { .. } => "Ping",
        FromDispatcher::ResultAck { .. } => "ResultAck",
        FromDispatcher::Error { .. } => "Error",
        FromDispatcher::ShuttingDown => "ShuttingDown",
        FromDispatcher::NotRecorded { .. } => "NotRecorded",
        FromDispatcher::Cancel { .. } => "Cancel",
        FromDispatcher::Status(_) => "Status",
        FromDispatcher::Runs { .. } => "Runs",
        FromDispatcher::Run(_) => "Run",
        FromDispatcher::NotFound { .. } => "NotFound",
        FromDispatcher::Ambiguous { .. } => "Ambiguous",
        FromDispatcher::LogData { .. } => "LogData",
        FromDispatcher::LogEnd { .. } => "LogEnd",
        FromDispatcher::Cancelled { .. } => "Cancelled",
        FromDispatcher::Why { .. } => "Why",
    }
}

/// What [`Client::submit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// Newly queued.
    pub queued: u32,
    /// Already queued, running or finished (and not re-run).
    pub known: u32,
}

impl Client {
    /// Connects to the dispatcher at `addr` (`host:port`) and says hello as a client.
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<Client, ClientError> {
        let conn = net::connect(addr, Role::Client, token.unwrap_or("")).await?;
        Ok(Client { conn })
    }

    async fn ask(&mut self, req: &ToDispatcher) -> Result<FromDispatcher, ClientError> {
        self.conn.send(req).await?;
        Ok(self
            .conn
            .recv_within(ANSWER_TIMEOUT, "the dispatcher's answer")
            .await?)
    }

    /// The queue, the runners and the counts.
    pub async fn status(&mut self) -> Result<DispatcherStatus, ClientError> {
        match self.ask(&ToDispatcher::Status).await? {
            FromDispatcher::Status(s) => Ok(*s),
            other => Err(unexpected(other)),
        }
    }

    /// Runs matching `query`, newest first, and how many match in all.
    pub async fn runs(&mut self, query: RunQuery) -> Result<(u64, Vec<RunSummary>), ClientError> {
        match self.ask(&ToDispatcher::Runs(query)).await? {
            FromDispatcher::Runs { total, runs } => Ok((total, runs)),
            other => Err(unexpected(other)),
        }
    }

    /// One run, by id or unique prefix.
    pub async fn run(&mut self, prefix: &str) -> Result<RunDetail, ClientError> {
        let req = ToDispatcher::Run {
            prefix: prefix.to_owned(),
        };
        match self.ask(&req).await? {
            FromDispatcher::Run(d) => Ok(*d),
            FromDispatcher::Ambiguous { candidates } => Err(ClientError::Ambiguous {
                prefix: prefix.to_owned(),
                candidates,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Submits `commits` (oldest first).
    pub async fn submit(
        &mut self,
        commits: Vec<CommitId>,
        branch: Option<String>,
        front: bool,
        rerun: bool,
    ) -> Result<Submitted, ClientError> {
        let req = ToDispatcher::Submit {
            commits,
            branch,
            front,
            rerun,
        };
        match self.ask(&req).await? {
            FromDispatcher::Submitted { queued, known } => Ok(Submitted { queued, known }),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels a queued or running commit; returns its state when the cancel arrived.
    pub async fn cancel(&mut self, commit: CommitId) -> Result<RunState, ClientError> {
        match self.ask(&ToDispatcher::Cancel { commit }).await? {
            FromDispatcher::Cancelled { was } => Ok(was),
            other => Err(unexpected(other)),
        }
    }

    /// Why `commit` is (not) running.
    pub async fn why(&mut self, commit: CommitId) -> Result<(RunState, String), ClientError> {
        match self.ask(&ToDispatcher::Why { commit }).await? {
            FromDispatcher::Why { state, reason } => Ok((state, reason)),
            other => Err(unexpected(other)),
        }
    }

    /// Starts reading `commit`'s log at `offset`; read the frames with
    /// [`Client::next_log`].
    pub async fn start_log(
        &mut self,
        commit: CommitId,
        offset: u64,
        follow: bool,
    ) -> Result<(), ClientError> {
        let req = ToDispatcher::FollowLog {
            commit,
            offset,
            follow,
        };
        Ok(self.conn.send(&req).await?)
    }

    /// The next piece of a log started with [`Client::start_log`]. While following, the
    /// dispatcher sends nothing when nothing happens, so this waits as long as the run
    /// does.
    pub async fn next_log(&mut self) -> Result<LogPiece, ClientError> {
        match self.conn.recv().await? {
            None => Err(ClientError::Proto(ProtoError::Closed)),
            Some(FromDispatcher::LogData { offset, data }) => Ok(LogPiece::Data { offset, data }),
            Some(FromDispatcher::LogEnd { offset, state }) => Ok(LogPiece::End { offset, state }),
            Some(other) => Err(unexpected(other)),
        }
    }
}

/// A piece of a followed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogPiece {
    /// Bytes starting at `offset`.
    Data {
        /// Where `data` starts in the log.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The end: the run is over (or, without follow, the end of the file was reached).
    End {
        /// Just past the last byte.
        offset: u64,
        /// The run's state.
        state: RunState,
    },
}

/// What [`follow_log`] hears while it reconnects.
#[derive(Debug)]
pub enum FollowEvent<'a> {
    /// New bytes of the log.
    Data(&'a [u8]),
    /// The dispatcher was lost; trying again in the given time.
    Reconnecting(&'a ClientError, Duration),
    /// Connected again after a loss.
    Reconnected,
}

/// Follows `commit`'s log from `offset` until the run ends, calling `on` with every new
/// piece. When the connection is lost (the dispatcher restarts), it reconnects with
/// backoff and resumes at the byte where it stopped, so nothing is shown twice or lost.
/// Gives up only on a permanent error (wrong token, an unknown commit) or when `give_up`
/// is reached. Returns the run's final state and the offset reached.
pub async fn follow_log(
    addr: &str,
    token: Option<&str>,
    commit: &CommitId,
    mut offset: u64,
    give_up: Option<tokio::time::Instant>,
    mut on: impl FnMut(FollowEvent<'_>),
) -> Result<Option<(RunState, u64)>, ClientError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut lost = false;
    loop {
        let attempt = async {
            let mut client = Client::connect(addr, token).await?;
            client.start_log(commit.clone(), offset, true).await?;
            if lost {
                on(FollowEvent::Reconnected);
                lost = false;
            }
            loop {
                match client.next_log().await? {
                    LogPiece::Data { offset: at, data } => {
                        // A resend that overlaps what we have is cut, never shown twice.
                        let skip = offset.saturating_sub(at);
                        if at > offset {
                            return Err(ClientError::Proto(ProtoError::Violation(format!(
                                "log data at {at} skips past offset {offset}"
                            ))));
                        }
                        if let Some(fresh) = usize::try_from(skip)
                            .ok()
                            .and_then(|s| data.get(s..))
                            .filter(|f| !f.is_empty())
                        {
                            on(FollowEvent::Data(fresh));
                            offset += fresh.len() as u64;
                        }
                    }
                    LogPiece::End { offset: end, state } => {
                        return Ok::<_, ClientError>((state, end.max(offset)))
                    }
                }
            }
        };
        let outcome = match give_up {
            Some(deadline) => match tokio::time::timeout_at(deadline, attempt).await {
                Ok(r) => r,
                Err(_) => return Ok(None),
            },
            None => attempt.await,
        };
        match outcome {
            Ok(end) => return Ok(Some(end)),
            Err(e) if e.is_unreachable() => {
                let delay = backoff.next_delay();
                if give_up.is_some_and(|d| tokio::time::Instant::now() + delay >= d) {
                    return Ok(None);
                }
                on(FollowEvent::Reconnecting(&e, delay));
                lost = true;
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}
