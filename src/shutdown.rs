//! One shutdown handle for a whole process: cancelled by Ctrl-C or SIGTERM (or by a test),
//! cloned into every task, which `select!`s on [`Shutdown::cancelled`].
//!
//! A process that can stop gently (the runner: finish the running job first) asks for
//! [`Shutdown::on_signals_draining`]: the first signal only requests a drain
//! ([`Shutdown::drain_requested`]) and the second one stops. Stopping implies draining.

use tokio_util::sync::CancellationToken;

/// A cloneable "stop now" signal, with an optional "stop when you can" before it.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    drain: CancellationToken,
}

impl Shutdown {
    /// A handle that is only cancelled by [`Shutdown::cancel`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle that is also cancelled on Ctrl-C or SIGTERM. Needs a tokio runtime.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        shutdown.watch_signals(false);
        shutdown
    }

    /// A handle whose first Ctrl-C or SIGTERM requests a drain and whose second one (of
    /// either kind) cancels it. Needs a tokio runtime.
    pub fn on_signals_draining() -> Self {
        let shutdown = Self::new();
        shutdown.watch_signals(true);
        shutdown
    }

    fn watch_signals(&self, drain_first: bool) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
                        None
                    }
                };
            let mut seen = 0u32;
            loop {
                let name = tokio::select! {
                    res = tokio::signal::ctrl_c() => {
                        if res.is_err() && term.is_none() {
                            return; // nothing can be watched
                        }
                        "SIGINT"
                    }
                    Some(()) = async {
                        match term.as_mut() {
                            Some(t) => t.recv().await,
                            None => std::future::pending().await,
                        }
                    } => "SIGTERM",
                };
                seen += 1;
                if drain_first && seen == 1 {
                    tracing::info!(signal = name, "draining: a second signal stops at once");
                    this.drain.cancel();
                } else {
                    tracing::info!(signal = name, "shutting down");
                    this.cancel();
                    return;
                }
            }
        });
    }

    /// Asks every holder to stop (and so to drain).
    pub fn cancel(&self) {
        self.drain.cancel();
        self.token.cancel();
    }

    /// Asks the holders that can to finish what they are doing and then stop.
    pub fn request_drain(&self) {
        self.drain.cancel();
    }

    /// Whether [`Shutdown::cancel`] has been called.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once shutdown is requested.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// Whether a drain (or a stop) has been requested.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Completes once a drain (or a stop) is requested.
    pub async fn drain_requested(&self) {
        self.drain.cancelled().await
    }

    /// A child token, cancelled with this one (or on its own); not by a drain.
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_implies_drain_but_not_the_reverse() {
        let s = Shutdown::new();
        let child = s.child_token();
        s.request_drain();
        assert!(s.is_draining() && !s.is_cancelled() && !child.is_cancelled());
        s.cancel();
        assert!(s.is_cancelled() && child.is_cancelled());
        let t = Shutdown::new();
        t.cancel();
        assert!(t.is_draining());
    }
}
