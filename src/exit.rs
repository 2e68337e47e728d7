//! How a tinyci process ends on an error: one line, `error: ` and the error's cause chain
//! with every cause said once, and an exit code that tells a supervisor (systemd, a
//! script) whether restarting can help.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | stopped on request (Ctrl-C, SIGTERM) |
//! | 1 | failed; restarting may help (storage failure, port taken…) |
//! | 2 | bad command line (clap's usage errors, including an address without a port) |
//! | 78 | permanent: the configuration must change — the dispatcher refused our hello (wrong token, another protocol version, wrong role), the peer is not a tinyci server, the token setting is empty or unreadable, `REPO_CLONE` is not a usable clone or is locked by another process |

use std::error::Error;
use std::process::ExitCode;

use tinyci_proto::ProtoError;

use crate::net::NetError;

/// Exit code: failed, restarting may help.
pub const FAILURE: u8 = 1;

/// Exit code: the configuration is wrong; restarting as is cannot help (`EX_CONFIG`).
pub const CONFIG: u8 = 78;

/// The error and its causes as one line, `outer: inner: …`, leaving out a cause whose text
/// the line already holds (many messages include their cause; printing it again as a
/// separate "caused by" is noise).
pub fn cause_chain(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

/// Whether any error in the chain says retrying cannot help.
pub fn is_permanent(e: &(dyn Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(n) = err.downcast_ref::<NetError>() {
            if n.is_permanent() {
                return true;
            }
        }
        if let Some(p) = err.downcast_ref::<ProtoError>() {
            if p.is_permanent() {
                return true;
            }
        }
        // A clone path that is not a usable clone (or is another process's): the message
        // says what to pass instead.
        if err
            .downcast_ref::<crate::git::GitError>()
            .is_some_and(|g| g.kind == crate::git::GitErrorKind::Usage)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Prints `error: <cause chain>` on stderr and returns the exit code for `e`. Call it after
/// the log writer is flushed (its guard dropped), so the line comes last.
pub fn report(e: &(dyn Error + 'static)) -> ExitCode {
    eprintln!("error: {}", cause_chain(e));
    ExitCode::from(if is_permanent(e) { CONFIG } else { FAILURE })
}

/// The body of every binary's `main`: starts logging and a tokio runtime, runs `run` to
/// completion, flushes the log, and turns an error into one `error:` line and its exit code.
pub fn main_with<E>(run: impl std::future::Future<Output = Result<(), E>>) -> ExitCode
where
    E: AsRef<dyn Error + 'static>,
{
    let log = crate::logging::init();
    let res = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run),
        Err(e) => {
            drop(log);
            return report(&e);
        }
    };
    drop(log);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Terse(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(cause_chain(&Repeats(io())), "outer: disk on fire");
        assert_eq!(cause_chain(&Terse(io())), "outer: disk on fire");
    }

    #[test]
    fn permanent_errors_are_found_anywhere_in_the_chain() {
        let refused = NetError::Handshake {
            addr: "h:1".into(),
            source: ProtoError::HelloRefused("missing or wrong token".into()),
        };
        assert!(is_permanent(&refused));
        let closed = NetError::Handshake {
            addr: "h:1".into(),
            source: ProtoError::Closed,
        };
        assert!(!is_permanent(&closed));
        #[derive(Debug, thiserror::Error)]
        #[error("runner stopped")]
        struct Wrap(#[source] NetError);
        assert!(is_permanent(&Wrap(refused)));
        assert!(!is_permanent(&Wrap(closed)));
    }
}
