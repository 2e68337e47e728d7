//! One shutdown handle for a whole process: cancelled by Ctrl-C or SIGTERM (or by a test),
//! cloned into every task, which `select!`s on [`Shutdown::cancelled`].

use tokio_util::sync::CancellationToken;

/// A cloneable "stop now" signal.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A handle that is only cancelled by [`Shutdown::cancel`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle that is also cancelled on Ctrl-C or SIGTERM. Needs a tokio runtime.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let token = shutdown.token.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
                        let _ = tokio::signal::ctrl_c().await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            token.cancel();
        });
        shutdown
    }

    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Whether [`Shutdown::cancel`] has been called.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once shutdown is requested.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// A child token, cancelled with this one (or on its own).
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }
}
