//! The dispatcher: accepts observers and runners on one port, keeps the queue and the pool,
//! checks runners with heartbeats, and stores results.
//!
//! Shape: [`run`] owns the accept loop; each connection gets a task (in a span naming the
//! peer) that does the handshake and then speaks its role's messages; all decisions are
//! made by the [`core`] thread, which the tasks feed with events.

pub mod client;
pub mod core;
pub mod journal;
pub mod recovery;
pub mod state;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use tinyci_proto::{Connection, FromDispatcher, ProtoError, Role, ToDispatcher, HANDSHAKE_TIMEOUT};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use self::core::{Core, Event, StorageError};
use self::store::sqlite::SqliteStore;
use self::store::StoreError;
use crate::lock::DirLock;
use crate::net::Transport;
use crate::results;
use crate::shutdown::Shutdown;

/// At most this many connections are served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 2048;

/// Events from the connections waiting for the core, at most: a connection whose event
/// does not fit waits (and so stops reading its peer) until the core catches up, so a
/// flood from the network cannot grow the dispatcher's memory without bound.
const EVENT_QUEUE: usize = 1024;

/// At most this many commits in one `Submit`.
pub const MAX_SUBMIT: usize = 10_000;

/// How long connection tasks get to finish after shutdown is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `<sha>.json` and `<sha>.log` go.
    pub results_dir: PathBuf,
    /// How often each runner is pinged.
    pub heartbeat_interval: Duration,
    /// A runner silent for this long is removed and its job requeued.
    pub heartbeat_timeout: Duration,
    /// Attempts before a commit that keeps losing its runner is recorded as `error`.
    pub max_attempts: u32,
    /// The shared secret peers must present, if any.
    pub token: Option<String>,
}

/// Why the dispatcher stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    /// The results directory could not be opened.
    #[error("cannot open results directory {dir}: {source}")]
    Open {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database could not be opened, or the state it holds not recovered.
    #[error("cannot open the database in {dir}/.tinyci: {source}")]
    Database {
        /// The results directory.
        dir: String,
        /// Why.
        source: StoreError,
    },
    /// A write that must not fail did.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Another dispatcher owns the results directory.
    #[error(transparent)]
    Locked(#[from] crate::lock::LockError),
    /// The core thread died.
    #[error("the dispatcher core stopped unexpectedly")]
    CoreDied,
}

struct Ctx {
    events: mpsc::SyncSender<Event>,
    config: Config,
    shutdown: Shutdown,
    /// Whether we already warned that a peer presented a token we do not check.
    warned_unchecked_token: std::sync::atomic::AtomicBool,
    /// Changes after every batch of the core: log followers wait on it.
    log_changed: tokio::sync::watch::Receiver<u64>,
    /// What `/metrics` counts of the runners' events, when HTTP is served.
    counters: Option<Arc<crate::http::metrics::Counters>>,
}

/// Where and how to serve HTTP (`dispatcher --http ADDR`).
pub struct Http {
    /// The bound listener.
    pub listener: TcpListener,
    /// Its settings.
    pub config: crate::http::Config,
}

/// Serves on `listener` (and HTTP on `http`'s, if given) until `shutdown` is cancelled (or
/// storage fails).
pub async fn run(
    listener: TcpListener,
    config: Config,
    http: Option<Http>,
    shutdown: Shutdown,
) -> Result<(), DispatcherError> {
    let dir = config.results_dir.clone();
    let open_err = |source| DispatcherError::Open {
        dir: dir.display().to_string(),
        source,
    };
    results::prepare_dir(&dir).map_err(open_err)?;
    // One owner per results directory: a second dispatcher would write the database and
    // the result files under the first one's feet. Held until `run` returns (the kernel
    // drops it if the process dies).
    let _owner = DirLock::acquire(&dir.join(results::STATE_DIR), "dispatcher")?;
    // A copy saved by a dispatcher whose database files were deleted under it.
    let db_file = store::sqlite::db_path(&dir);
    match store::watch::install_rescued(&db_file) {
        Ok(true) => {
            warn!(db = %db_file.display(), "put in place the database saved by the last dispatcher when its files were deleted or moved under it")
        }
        Ok(false) => {}
        Err(e) => {
            return Err(DispatcherError::Database {
                dir: dir.display().to_string(),
                source: store::StoreError::Io {
                    what: format!("putting {} in place", store::watch::RESCUED_FILE),
                    source: e,
                },
            })
        }
    }
    // Opening the database and recovering block: off the async workers.
    let grace = (config.heartbeat_timeout * 2).max(Duration::from_secs(6));
    let (core_dir, max_attempts) = (dir.clone(), config.max_attempts);
    let (changed, log_changed) = tokio::sync::watch::channel(0u64);
    let counters = http
        .as_ref()
        .map(|_| Arc::new(crate::http::metrics::Counters::default()));
    let core_counters = counters.clone();
    let (events, rx) = event_queue();
    let wake_events = events.clone();
    let core = tokio::task::spawn_blocking(move || {
        let db_err = |source| DispatcherError::Database {
            dir: core_dir.display().to_string(),
            source,
        };
        let mut store = SqliteStore::open(&core_dir).map_err(db_err)?;
        let unfinished = recovery::recover(&core_dir, &mut store).map_err(db_err)?;
        // Clients' questions are read on a connection of their own.
        let history = store::sqlite::SqliteReader::open(&core_dir).map_err(db_err)?;
        let reads = store::sqlite::SqliteReader::open(&core_dir).map_err(db_err)?;
        let store: Box<dyn store::Store + Send> = match &core_counters {
            Some(c) => Box::new(crate::http::metrics::CountingStore::new(store, c.clone())),
            None => Box::new(store),
        };
        Core::new(
            core_dir,
            store,
            Box::new(history),
            Box::new(reads),
            changed,
            max_attempts,
            unfinished,
            grace,
            // A full queue needs no wake-up: the core is busy with it, and looks at the
            // store's answers after every batch.
            move || {
                let _ = wake_events.try_send(Event::Wake);
            },
        )
        .map_err(DispatcherError::from)
    })
    .await
    .map_err(|_| DispatcherError::CoreDied)??;
    let core_shutdown = shutdown.clone();
    let core_thread = std::thread::Builder::new()
        .name("dispatcher-core".into())
        .spawn(move || {
            let res = core.run(rx);
            if let Err(e) = &res {
                tracing::error!(error = %e, "stopping: cannot keep results safely");
                core_shutdown.cancel();
            }
            res
        })
        .map_err(open_err)?;

    let ctx = Arc::new(Ctx {
        events: events.clone(),
        config,
        shutdown: shutdown.clone(),
        warned_unchecked_token: std::sync::atomic::AtomicBool::new(false),
        log_changed: log_changed.clone(),
        counters: counters.clone(),
    });
    let addr = listener.local_addr().map_err(open_err)?;
    info!(addr = %addr, results = %dir.display(), "listening");
    let http_task = match (http, counters) {
        (Some(http), Some(counters)) => {
            let handle = crate::http::CoreHandle {
                events: events.clone(),
                log_changed,
                results_dir: dir.clone(),
                token: ctx.config.token.clone(),
                counters,
            };
            let shutdown = shutdown.clone();
            Some(tokio::spawn(async move {
                if let Err(e) =
                    crate::http::serve(http.listener, http.config, handle, shutdown).await
                {
                    warn!(error = %e, "the http server stopped");
                }
            }))
        }
        _ => None,
    };

    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut accept_backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            res = listener.accept() => match res {
                Ok(pair) => { accept_backoff = Duration::from_millis(10); pair }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(peer = %peer, "too many connections; closing this one");
            continue;
        };
        let ctx = ctx.clone();
        let span = tracing::info_span!("conn", peer = %peer);
        crate::net::tune_stream(&stream);
        tracker.spawn(
            async move {
                serve(stream, peer, &ctx).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        warn!("some connections did not finish in time");
    }
    if let Some(task) = http_task {
        // It caps its own drain; it holds a sender of the core's queue until it ends.
        let _ = task.await;
    }
    let mut pending = Some(Event::Shutdown);
    while let Some(ev) = pending.take() {
        if let Err(mpsc::TrySendError::Full(ev)) = events.try_send(ev) {
            pending = Some(ev);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    drop(ctx);
    drop(events);
    match tokio::task::spawn_blocking(move || core_thread.join()).await {
        Ok(Ok(res)) => res.map_err(DispatcherError::from),
        _ => Err(DispatcherError::CoreDied),
    }
}

/// The queue from the connections to the core, bounded by [`EVENT_QUEUE`].
fn event_queue() -> (mpsc::SyncSender<Event>, mpsc::Receiver<Event>) {
    mpsc::sync_channel(EVENT_QUEUE)
}

/// Hands `ev` to the core, waiting while its queue is full; `Err` once the core is gone.
async fn feed(ctx: &Ctx, mut ev: Event) -> Result<(), ()> {
    if let Some(c) = &ctx.counters {
        c.observe(&ev);
    }
    loop {
        match ctx.events.try_send(ev) {
            Ok(()) => return Ok(()),
            Err(mpsc::TrySendError::Full(back)) => {
                ev = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(()),
        }
    }
}

/// Serves one connection (of any [`Transport`]: a tuned TCP stream, or a pipe in tests)
/// from its hello to its end.
async fn serve(stream: impl Transport, peer: SocketAddr, ctx: &Ctx) {
    let mut conn = Connection::new(stream);
    let role = match conn
        .accept_hello(
            &[Role::Observer, Role::Runner, Role::Client],
            ctx.config.token.as_deref(),
        )
        .await
    {
        Ok(greeting) => {
            if greeting.presented_token
                && ctx.config.token.is_none()
                && !ctx
                    .warned_unchecked_token
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                warn!(role = %greeting.role, "a peer presented a token, but this dispatcher has none and accepts anyone; set TINYCI_TOKEN or --token-file here too (warned once)");
            }
            greeting.role
        }
        Err(e) => {
            warn!(error = %e, "handshake failed; connection closed");
            return;
        }
    };
    if ctx.shutdown.is_cancelled() {
        // Accepted just as the dispatcher began to stop: serve nothing more.
        return;
    }
    let res = match role {
        Role::Observer => serve_observer(&mut conn, ctx).await,
        Role::Client => client::serve_client(&mut conn, ctx).await,
        Role::Runner => serve_runner(&mut conn, peer, ctx).await,
    };
    if let Err(e) = res {
        warn!(role = %role, error = %e, "connection closed on error");
        // Tell the peer why, where it can still read: the write half works after a bad frame.
        if matches!(e, ProtoError::Decode(_) | ProtoError::FrameTooLarge) {
            let _ = conn
                .send(&FromDispatcher::Error {
                    reason: e.to_string(),
                })
                .await;
        }
    }
}

async fn serve_observer(
    conn: &mut Connection<impl Transport>,
    ctx: &Ctx,
) -> Result<(), ProtoError> {
    info!("observer connected");
    loop {
        let msg = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            msg = conn.recv::<ToDispatcher>() => msg?,
        };
        match msg {
            None => {
                info!("observer disconnected");
                return Ok(());
            }
            Some(ToDispatcher::Submit {
                commits,
                branch,
                front,
                rerun,
            }) => {
                if commits.len() > MAX_SUBMIT {
                    return refuse(
                        conn,
                        format!("more than {MAX_SUBMIT} commits in one Submit"),
                    )
                    .await;
                }
                let (reply, answer) = oneshot::channel();
                let ev = Event::Submit {
                    commits,
                    branch: branch.filter(|b| client::usable_branch(b)),
                    front,
                    rerun,
                    reply,
                };
                if feed(ctx, ev).await.is_err() {
                    return Ok(()); // shutting down
                }
                let Ok(answer) = answer.await else {
                    return Ok(()); // the core stopped; no acknowledgement
                };
                conn.send(&answer).await?;
            }
            Some(other) => {
                return refuse(
                    conn,
                    format!("unexpected message from an observer: {}", name(&other)),
                )
                .await
            }
        }
    }
}

async fn serve_runner(
    conn: &mut Connection<impl Transport>,
    peer: SocketAddr,
    ctx: &Ctx,
) -> Result<(), ProtoError> {
    let (addr, held, paused) = match conn
        .recv_within::<ToDispatcher>(HANDSHAKE_TIMEOUT, "the runner's Register")
        .await?
    {
        ToDispatcher::Register { addr, held, paused } => (addr, held, paused),
        other => {
            return refuse(conn, format!("expected Register, got {}", name(&other))).await;
        }
    };
    if addr.is_empty() || addr.len() > 256 || addr.chars().any(|c| c.is_control()) {
        return refuse(conn, "Register carries an unusable address".into()).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (reply, answer) = oneshot::channel();
    let joined = Event::RunnerJoined {
        addr: addr.clone(),
        held,
        paused: paused.map(|r| truncate(r, MAX_REASON)),
        tx,
        reply,
    };
    if feed(ctx, joined).await.is_err() {
        return Ok(());
    }
    let Ok((id, verdict)) = answer.await else {
        return Ok(());
    };
    info!(runner = %id, addr = %addr, peer = %peer, "runner registered");
    let res = async {
        conn.send(&FromDispatcher::Registered {
            runner: id,
            held: verdict,
            heartbeat_timeout: ctx.config.heartbeat_timeout,
        })
        .await?;
        runner_loop(conn, ctx, id, &mut rx).await
    }
    .await;
    let (reason, goodbye) = match &res {
        // The dispatcher is stopping, not losing the runner: nothing is requeued or
        // counted, and the database keeps the job as running, so the restarted dispatcher
        // adopts it (exactly as after a kill -9).
        Ok(Ended::Shutdown) => return Ok(()),
        Ok(Ended::Lost(reason)) => (reason.clone(), false),
        Ok(Ended::Goodbye(reason)) => (reason.clone(), true),
        Err(e) => (e.to_string(), false),
    };
    let _ = feed(
        ctx,
        Event::RunnerLost {
            runner: id,
            reason,
            goodbye,
        },
    )
    .await;
    res.map(|_| ())
}

/// How a runner's connection ended (other than by an error).
enum Ended {
    /// The dispatcher is shutting down.
    Shutdown,
    /// The runner went away or went silent.
    Lost(String),
    /// The runner said goodbye: it stops on purpose.
    Goodbye(String),
}

/// The longest reason from a runner that is kept (the rest is cut).
const MAX_REASON: usize = 4096;

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Relays between one runner and the core until the runner goes away; returns why.
async fn runner_loop(
    conn: &mut Connection<impl Transport>,
    ctx: &Ctx,
    id: tinyci_proto::RunnerId,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<FromDispatcher>,
) -> Result<Ended, ProtoError> {
    let interval = ctx.config.heartbeat_interval;
    let timeout = ctx.config.heartbeat_timeout;
    let mut ping = tokio::time::interval(interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let silence = tokio::time::sleep(timeout);
    tokio::pin!(silence);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            // Pings and messages to the runner before the runner's frames: a runner that
            // streams output keeps `recv` always ready, and must still hear from us. (Each
            // of those is ready only now and then, so `recv` does not starve.)
            biased;
            _ = ctx.shutdown.cancelled() => {
                // Tell the runner this is a restart, not a failure: it keeps its job and
                // reconnects at once. Best effort: the runner also notices the close.
                let _ = conn.send(&FromDispatcher::ShuttingDown).await;
                return Ok(Ended::Shutdown);
            }
            out = rx.recv() => match out {
                Some(msg) => {
                    // What the core let out together (a result's acknowledgement and the
                    // next job) goes out in one write.
                    let mut msgs = vec![msg];
                    while msgs.len() < 64 {
                        let Ok(more) = rx.try_recv() else { break };
                        msgs.push(more);
                    }
                    conn.send_all(&msgs).await?
                }
                None => return Ok(Ended::Lost("dropped by the core".into())),
            },
            _ = ping.tick() => {
                seq += 1;
                conn.send(&FromDispatcher::Ping { seq }).await?;
            }
            msg = conn.recv::<ToDispatcher>() => {
                let Some(msg) = msg? else {
                    return Ok(Ended::Lost("connection closed".into()));
                };
                silence.as_mut().reset(Instant::now() + timeout);
                let ev = match msg {
                    ToDispatcher::Pong { .. } => continue,
                    ToDispatcher::Log { job, offset, data } => Event::Log { runner: id, job, offset, data },
                    ToDispatcher::Done { job, report, log_len } => Event::Done { runner: id, job, report, log_len },
                    ToDispatcher::Pause { reason } => Event::Pause { runner: id, reason: truncate(reason, MAX_REASON) },
                    ToDispatcher::Resume => Event::Resume { runner: id },
                    ToDispatcher::GiveBack { job, reason, cause } => Event::GiveBack { runner: id, job, reason: truncate(reason, MAX_REASON), cause },
                    ToDispatcher::Goodbye { reason } => return Ok(Ended::Goodbye(truncate(reason, MAX_REASON))),
                    other => {
                        refuse(conn, format!("unexpected message from a runner: {}", name(&other))).await?;
                        return Ok(Ended::Lost("protocol error".into()));
                    }
                };
                if feed(ctx, ev).await.is_err() {
                    return Ok(Ended::Shutdown);
                }
            }
            () = &mut silence => {
                warn!(runner = %id, timeout = ?timeout, "heartbeat timeout; removing runner");
                return Ok(Ended::Lost(format!("no heartbeat for {timeout:?}")));
            }
        }
    }
}

/// Tells the peer why it is being disconnected, then reports the same as an error.
async fn refuse(conn: &mut Connection<impl Transport>, reason: String) -> Result<(), ProtoError> {
    let _ = conn
        .send(&FromDispatcher::Error {
            reason: reason.clone(),
        })
        .await;
    Err(ProtoError::Violation(reason))
}

fn name(msg: &ToDispatcher) -> &'static str {
    match msg {
        ToDispatcher::Submit { .. } => "Submit",
        ToDispatcher::Register { .. } => "Register",
        ToDispatcher::Pong { .. } => "Pong",
        ToDispatcher::Log { .. } => "Log",
        ToDispatcher::Done { .. } => "Done",
        ToDispatcher::Pause { .. } => "Pause",
        ToDispatcher::Resume => "Resume",
        ToDispatcher::GiveBack { .. } => "GiveBack",
        ToDispatcher::Goodbye { .. } => "Goodbye",
        ToDispatcher::Status => "Status",
        ToDispatcher::Runs(_) => "Runs",
        ToDispatcher::Run { .. } => "Run",
        ToDispatcher::FollowLog { .. } => "FollowLog",
        ToDispatcher::Cancel { .. } => "Cancel",
        ToDispatcher::Why { .. } => "Why",
    }
}

#[cfg(test)]
mod conn_tests;
