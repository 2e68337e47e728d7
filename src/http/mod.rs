//! `dispatcher --http ADDR`: the JSON API, the live page, Server-Sent Events, the badge and
//! the Prometheus metrics, all answered from the dispatcher's core (the same typed answers
//! the `tinyci` command renders) and from the `<sha>.log` files.
//!
//! Shape: [`serve`] takes a bound listener and serves until shutdown. Every handler asks
//! the core with [`Event::Client`] (or submits with [`Event::Submit`]) through the same
//! bounded queue the TCP connections use; log followers read the log file from their own
//! offset and wait on the core's change notification, so no client, however slow, makes
//! the dispatcher buffer anything for it. Connections are capped and idle ones closed by
//! [`listener::Capped`].

mod api;
mod listener;
mod live;
mod log;
pub mod metrics;
mod pages;

use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use tinyci_proto::{CommitId, FromDispatcher, ToDispatcher};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::info;

use crate::dispatcher::core::Event;
use crate::shutdown::Shutdown;

/// At most this many HTTP connections at once, by default; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 4096;

/// A connection that moves no byte either way for this long is closed, by default (a
/// follower is sent a keep-alive comment well within it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often an event stream sends a keep-alive comment, at most.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long a (non-streaming) request may take before it is answered with 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// How long connections get to finish after shutdown is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct Config {
    /// At most this many connections at once.
    pub max_connections: usize,
    /// A connection silent both ways for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: MAX_CONNECTIONS,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// What the server needs from the dispatcher: its core's queue, its change notification,
/// its results directory and its token.
#[derive(Clone)]
pub struct CoreHandle {
    /// The core's event queue.
    pub events: SyncSender<Event>,
    /// Bumped by the core after every batch.
    pub log_changed: watch::Receiver<u64>,
    /// Where the `<sha>.log` files are.
    pub results_dir: PathBuf,
    /// The bearer token POSTs must present, if the dispatcher has one.
    pub token: Option<String>,
    /// What the core's connections count for `/metrics`.
    pub counters: Arc<metrics::Counters>,
}

/// Shared by every handler.
#[derive(Clone)]
pub(crate) struct App(Arc<Inner>);

pub(crate) struct Inner {
    core: CoreHandle,
    shutdown: Shutdown,
    live: watch::Sender<Arc<live::Snapshot>>,
    /// How often an event stream sends a keep-alive comment: well within the idle timeout.
    keep_alive: Duration,
}

impl std::ops::Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Why a request failed: each maps to a status code and a JSON body `{"error": …}`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// Malformed input.
    #[error("{0}")]
    BadRequest(String),
    /// No or a wrong bearer token.
    #[error("this request needs the dispatcher's token: Authorization: Bearer TOKEN")]
    Unauthorized,
    /// Nothing matches.
    #[error("{0}")]
    NotFound(String),
    /// A prefix that matches several commits.
    #[error("the prefix matches several commits: {}", .0.join(", "))]
    Ambiguous(Vec<String>),
    /// A byte range outside the log.
    #[error("the range starts past the end of the log ({len} bytes)")]
    RangeNotSatisfiable {
        /// The log's length.
        len: u64,
    },
    /// The dispatcher is stopping or its core is gone.
    #[error("the dispatcher is stopping")]
    Unavailable,
    /// The core answered with an error.
    #[error("{0}")]
    Core(String),
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong, in words.
    error: String,
    /// For an ambiguous prefix: some of the commits it matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    candidates: Option<Vec<String>>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Ambiguous(_) => StatusCode::CONFLICT,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Core(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let candidates = match &self {
            ApiError::Ambiguous(c) => Some(c.clone()),
            _ => None,
        };
        let body = ErrorBody {
            error: self.to_string(),
            candidates,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        match self {
            ApiError::Unauthorized => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            ApiError::RangeNotSatisfiable { len } => {
                if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{len}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

impl App {
    /// Hands `ev` to the core, waiting while its queue is full.
    async fn feed(&self, mut ev: Event) -> Result<(), ApiError> {
        loop {
            match self.core.events.try_send(ev) {
                Ok(()) => return Ok(()),
                Err(mpsc::TrySendError::Full(back)) => {
                    ev = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => return Err(ApiError::Unavailable),
            }
        }
    }

    /// Asks the core one client question.
    async fn ask(&self, req: ToDispatcher) -> Result<FromDispatcher, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.feed(Event::Client { req, reply }).await?;
        match answer.await {
            Ok(FromDispatcher::Error { reason }) => Err(ApiError::Core(reason)),
            Ok(FromDispatcher::NotFound { what }) => Err(ApiError::NotFound(what)),
            Ok(FromDispatcher::Ambiguous { candidates }) => Err(ApiError::Ambiguous(
                candidates.iter().map(|c| c.as_str().to_owned()).collect(),
            )),
            Ok(answer) => Ok(answer),
            Err(_) => Err(ApiError::Unavailable),
        }
    }

    /// The dispatcher's status (queue, running, runners, counts).
    async fn status(&self) -> Result<tinyci_proto::DispatcherStatus, ApiError> {
        match self.ask(ToDispatcher::Status).await? {
            FromDispatcher::Status(s) => Ok(*s),
            other => Err(unexpected(&other)),
        }
    }

    /// One run, by id or unique prefix.
    async fn run(&self, prefix: &str) -> Result<tinyci_proto::RunDetail, ApiError> {
        if !crate::dispatcher::client::valid_prefix(prefix) {
            return Err(ApiError::NotFound(format!(
                "{:?} is not a commit id or a prefix of one (4 to 64 lowercase hex digits)",
                prefix.chars().take(80).collect::<String>()
            )));
        }
        match self
            .ask(ToDispatcher::Run {
                prefix: prefix.to_owned(),
            })
            .await?
        {
            FromDispatcher::Run(d) => Ok(*d),
            other => Err(unexpected(&other)),
        }
    }

    /// The state of `commit` as the core knows it: `None` when it was never submitted.
    async fn state_of(
        &self,
        commit: &CommitId,
    ) -> Result<Option<tinyci_proto::RunState>, ApiError> {
        match self
            .ask(ToDispatcher::Why {
                commit: commit.clone(),
            })
            .await
        {
            Ok(FromDispatcher::Why { state, .. }) => Ok(Some(state)),
            Ok(other) => Err(unexpected(&other)),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks the bearer token, when the dispatcher has one.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.core.token else {
            return Ok(());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if tinyci_proto::constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

fn unexpected(answer: &FromDispatcher) -> ApiError {
    ApiError::Core(format!("unexpected answer from the core: {answer:?}"))
}

/// A full commit id from a path segment (the hostile ones end here with a 400).
fn full_commit(s: &str) -> Result<CommitId, ApiError> {
    CommitId::parse(s).map_err(|_| {
        ApiError::BadRequest(format!(
            "{:?} is not a full commit id (40 or 64 lowercase hex digits)",
            s.chars().take(80).collect::<String>()
        ))
    })
}

/// Every route.
fn router(app: App) -> Router {
    use tower_http::limit::RequestBodyLimitLayer;
    use tower_http::timeout::TimeoutLayer;
    // Streams (logs, events) answer at once and then run on: the timeout bounds only the
    // time to the response head.
    let api = Router::new()
        .route("/runs", get(api::runs))
        .route("/run/{sha}", get(api::run).post(api::submit))
        .route("/run/{sha}/cancel", post(api::cancel))
        .route("/run/{sha}/log", get(log::raw_log))
        .route("/queue", get(api::queue))
        .route("/runners", get(api::runners))
        .route("/events", get(log::events))
        .route("/metrics", get(metrics::metrics))
        .route("/badge.svg", get(pages::badge))
        .route("/", get(pages::index))
        .route("/style.css", get(pages::style))
        .route("/app.js", get(pages::script))
        .with_state(app);
    Router::new()
        .merge(api)
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .url("/openapi.json", <api::ApiDoc as utoipa::OpenApi>::openapi()),
        )
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
}

/// Serves HTTP on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    core: CoreHandle,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let (live, _) = watch::channel(Arc::new(live::Snapshot::default()));
    let app = App(Arc::new(Inner {
        core,
        shutdown: shutdown.clone(),
        live,
        keep_alive: (config.idle_timeout / 3).clamp(Duration::from_millis(100), KEEP_ALIVE),
    }));
    let refresher = tokio::spawn(live::refresh(app.clone()));
    let listener = listener::Capped::new(listener, config.max_connections, config.idle_timeout);
    info!(addr = %addr, "http listening on {addr}");
    let stop = shutdown.clone();
    let server = axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let res = tokio::select! {
        res = server => res,
        // Graceful shutdown waits for every connection; a client that never reads is
        // not waited for longer than the drain.
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => Ok(()),
    };
    refresher.abort();
    res
}

/// `Query<T>` whose rejection is a JSON 400 like every other error.
pub(crate) struct Q<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Q<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Q(v)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}
