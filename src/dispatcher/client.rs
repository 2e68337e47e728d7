//! The dispatcher's side of a `Client` connection (`tinyci`, the git hooks, tests): each
//! request is answered by the core, which owns the truth, except the log, which is read
//! here from `<sha>.log` at the client's own offset. A follower waits on the core's
//! change notification and reads the file again: nothing is buffered per follower, so a
//! slow client costs the dispatcher no memory.

use std::io::SeekFrom;
use std::time::Duration;

use tinyci_proto::{CommitId, Connection, FromDispatcher, ProtoError, RunState, ToDispatcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite};
use tokio::sync::oneshot;
use tracing::debug;

use super::core::Event;
use super::{feed, name, refuse, Ctx, MAX_SUBMIT};
use crate::results;

/// A client that sends no request for this long is disconnected (a follower is never
/// idle: it waits on the run, not on its client).
pub const CLIENT_IDLE: Duration = Duration::from_secs(300);

/// The most log bytes in one frame.
pub const LOG_CHUNK: usize = 64 * 1024;

/// How often a follower looks at the file even without a notification (a safety net:
/// notifications are the normal path).
const FOLLOW_RECHECK: Duration = Duration::from_secs(1);

/// Serves one client until it closes, goes idle, or the dispatcher stops.
pub(super) async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &Ctx,
) -> Result<(), ProtoError> {
    loop {
        let msg = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            msg = tokio::time::timeout(CLIENT_IDLE, conn.recv::<ToDispatcher>()) => match msg {
                Ok(m) => m?,
                Err(_) => {
                    debug!("idle client disconnected");
                    return Ok(());
                }
            },
        };
        let Some(msg) = msg else {
            return Ok(());
        };
        let answer = match msg {
            ToDispatcher::Submit { ref commits, .. } if commits.len() > MAX_SUBMIT => {
                return refuse(
                    conn,
                    format!("more than {MAX_SUBMIT} commits in one Submit"),
                )
                .await;
            }
            ToDispatcher::Submit {
                commits,
                branch,
                front,
                rerun,
            } => {
                let (reply, answer) = oneshot::channel();
                let branch = branch.filter(|b| usable_branch(b));
                let ev = Event::Submit {
                    commits,
                    branch,
                    front,
                    rerun,
                    reply,
                };
                ask(ctx, ev, answer).await
            }
            ToDispatcher::FollowLog {
                commit,
                offset,
                follow,
            } => {
                follow_log(conn, ctx, commit, offset, follow).await?;
                continue;
            }
            ToDispatcher::Run { ref prefix } if !valid_prefix(prefix) => {
                Some(FromDispatcher::NotFound {
                    what: format!(
                        "{:?} is not a commit id or a prefix of one (4 to 64 lowercase hex digits)",
                        prefix.chars().take(80).collect::<String>()
                    ),
                })
            }
            req @ (ToDispatcher::Status
            | ToDispatcher::Runs(_)
            | ToDispatcher::Run { .. }
            | ToDispatcher::Cancel { .. }
            | ToDispatcher::Why { .. }) => {
                let (reply, answer) = oneshot::channel();
                ask(ctx, Event::Client { req, reply }, answer).await
            }
            other => {
                return refuse(
                    conn,
                    format!("unexpected message from a client: {}", name(&other)),
                )
                .await;
            }
        };
        let Some(answer) = answer else {
            return Ok(()); // the dispatcher is stopping
        };
        conn.send(&answer).await?;
    }
}

/// A branch name worth recording: short and printable.
pub fn usable_branch(b: &str) -> bool {
    !b.is_empty() && b.len() <= 255 && !b.chars().any(char::is_control)
}

/// Whether `p` can be a prefix of a commit id.
pub fn valid_prefix(p: &str) -> bool {
    (4..=64).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hands `ev` to the core and waits for its answer; `None` when the core is gone.
async fn ask(
    ctx: &Ctx,
    ev: Event,
    answer: oneshot::Receiver<FromDispatcher>,
) -> Option<FromDispatcher> {
    feed(ctx, ev).await.ok()?;
    answer.await.ok()
}

/// The state of `commit` as the core knows it: `None` when it is unknown.
async fn state_of(ctx: &Ctx, commit: &CommitId) -> Result<Option<RunState>, ()> {
    let (reply, answer) = oneshot::channel();
    let req = ToDispatcher::Why {
        commit: commit.clone(),
    };
    match ask(ctx, Event::Client { req, reply }, answer).await {
        Some(FromDispatcher::Why { state, .. }) => Ok(Some(state)),
        Some(_) => Ok(None),
        None => Err(()),
    }
}

/// Sends `commit`'s log from `offset`; with `follow`, goes on as the run writes it, until
/// the run ends (every byte sent) or the client goes away.
async fn follow_log<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &Ctx,
    commit: CommitId,
    mut offset: u64,
    follow: bool,
) -> Result<(), ProtoError> {
    let path = results::log_path(&ctx.config.results_dir, &commit);
    let mut changed = ctx.log_changed.clone();
    let mut buf = vec![0u8; LOG_CHUNK];
    loop {
        changed.borrow_and_update();
        // The state first, the file second: once the run is seen finished, everything it
        // wrote is in the file, and one more read reaches the end.
        let Ok(state) = state_of(ctx, &commit).await else {
            return Ok(()); // stopping: the client reconnects and resumes
        };
        let file = tokio::fs::File::open(&path).await;
        let state = match state {
            Some(s) => s,
            None if file.is_err() => {
                conn.send(&FromDispatcher::NotFound {
                    what: format!("no run of {commit} is known"),
                })
                .await?;
                return Ok(());
            }
            // A log without a run (left from an older results directory): its bytes, then
            // the end.
            None => RunState::Error,
        };
        if let Ok(mut f) = file {
            if f.seek(SeekFrom::Start(offset)).await.is_ok() {
                loop {
                    let n = f.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    conn.send(&FromDispatcher::LogData {
                        offset,
                        data: buf[..n].to_vec(),
                    })
                    .await?;
                    offset += n as u64;
                }
            }
        }
        if !follow || state.is_finished() {
            conn.send(&FromDispatcher::LogEnd { offset, state }).await?;
            return Ok(());
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = changed.changed() => {}
            _ = tokio::time::sleep(FOLLOW_RECHECK) => {}
            // While following, the client only listens: anything from it (or its close)
            // ends the follow.
            msg = conn.recv::<ToDispatcher>() => {
                return match msg? {
                    None => Ok(()),
                    Some(other) => refuse(conn, format!("{} while following a log", name(&other))).await,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_lowercase_hex_of_a_usable_length() {
        assert!(valid_prefix("abcd"));
        assert!(valid_prefix(&"f".repeat(64)));
        assert!(!valid_prefix("abc"));
        assert!(!valid_prefix("ABCD"));
        assert!(!valid_prefix("../etc"));
        assert!(!valid_prefix(&"a".repeat(65)));
    }

    #[test]
    fn branch_names_are_kept_only_when_printable() {
        assert!(usable_branch("main"));
        assert!(!usable_branch(""));
        assert!(!usable_branch("a\nb"));
        assert!(!usable_branch(&"b".repeat(300)));
    }
}
