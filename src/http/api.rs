//! The JSON API: the core's typed answers in the shape `tinyci --json` prints (`id`,
//! `status`, RFC 3339 times), documented as OpenAPI by the same types.

use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tinyci_proto::{
    AttemptView, FromDispatcher, QueuedView, RunDetail, RunQuery, RunState, RunSummary,
    RunnerState, RunnerView, StepReport, StepStatus, ToDispatcher,
};
use tokio::sync::oneshot;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{full_commit, ApiError, App, ErrorBody, Q};
use crate::dispatcher::core::Event;

/// The most runs one page lists (the core caps it too).
const MAX_LIMIT: u32 = 500;

pub(crate) fn rfc3339_ms(ms: u64) -> String {
    crate::results::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

/// One run in a list.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub(crate) struct Run {
    /// The commit id.
    pub id: String,
    /// `queued`, `running`, `success`, `failure`, `error` or `cancelled`.
    pub status: String,
    /// The branch it was found on, if known.
    pub branch: Option<String>,
    /// The steps that failed or timed out.
    pub failed_steps: Vec<String>,
    /// When it was queued (RFC 3339).
    pub queued_at: String,
    /// When it finished (RFC 3339), if it has.
    pub finished_at: Option<String>,
    /// Attempts that counted so far.
    pub attempts: u32,
}

impl From<&RunSummary> for Run {
    fn from(r: &RunSummary) -> Run {
        Run {
            id: r.commit.as_str().to_owned(),
            status: r.state.as_str().to_owned(),
            branch: r.branch.clone(),
            failed_steps: r.failed_steps.clone(),
            queued_at: rfc3339_ms(r.queued_at_ms),
            finished_at: r.finished_at_ms.map(rfc3339_ms),
            attempts: r.attempts,
        }
    }
}

/// A page of runs.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct RunPage {
    /// How many runs match in all.
    pub total: u64,
    /// This page, newest first.
    pub data: Vec<Run>,
}

pub(crate) fn step_word(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Success => "success",
        StepStatus::Failure => "failure",
        StepStatus::Timeout => "timeout",
        StepStatus::Skipped => "skipped",
    }
}

/// One step of a result.
#[derive(Serialize, ToSchema)]
pub(crate) struct Step {
    /// Its name in `.tinyci.toml`.
    name: String,
    /// `success`, `failure`, `timeout` or `skipped`.
    status: &'static str,
    /// The exit code, when the process exited by itself.
    exit_code: Option<i32>,
    /// Wall time in milliseconds.
    duration_ms: u64,
}

impl From<&StepReport> for Step {
    fn from(s: &StepReport) -> Step {
        Step {
            name: s.name.clone(),
            status: step_word(s.status),
            exit_code: s.exit_code,
            duration_ms: s.duration_ms,
        }
    }
}

/// One attempt of a run.
#[derive(Serialize, ToSchema)]
pub(crate) struct Attempt {
    /// The attempt's id.
    job: String,
    /// The runner's address.
    runner: String,
    /// When it was handed out.
    started_at: String,
    /// When it ended, if it has.
    ended_at: Option<String>,
    /// `running`, `reported`, `failed` or `returned`.
    outcome: String,
    /// Why it ended without a result.
    reason: Option<String>,
}

impl From<&AttemptView> for Attempt {
    fn from(a: &AttemptView) -> Attempt {
        Attempt {
            job: a.job.to_string(),
            runner: a.runner.clone(),
            started_at: rfc3339_ms(a.started_at_ms),
            ended_at: a.ended_at_ms.map(rfc3339_ms),
            outcome: a.outcome.clone(),
            reason: a.reason.clone(),
        }
    }
}

/// Everything known about one run.
#[derive(Serialize, ToSchema)]
pub(crate) struct RunFull {
    /// The list line.
    #[serde(flatten)]
    run: Run,
    /// The result's steps, once there is a result.
    steps: Vec<Step>,
    /// The runner of the result (or of the running attempt).
    runner: Option<String>,
    /// When the attempt that produced the result started.
    started_at: Option<String>,
    /// Why the run ended in `error`.
    error: Option<String>,
    /// The log's length in bytes so far.
    log_bytes: u64,
    /// Every attempt, oldest first.
    attempt_history: Vec<Attempt>,
}

impl From<&RunDetail> for RunFull {
    fn from(d: &RunDetail) -> RunFull {
        RunFull {
            run: Run::from(&d.summary),
            steps: d.steps.iter().map(Step::from).collect(),
            runner: d.runner.clone(),
            started_at: d.started_at_ms.map(rfc3339_ms),
            error: d.error.clone(),
            log_bytes: d.log_len,
            attempt_history: d.attempts.iter().map(Attempt::from).collect(),
        }
    }
}

/// A commit waiting in the queue.
#[derive(Serialize, ToSchema)]
pub(crate) struct Waiting {
    /// The commit id.
    id: String,
    /// Its branch, if known.
    branch: Option<String>,
    /// When it was queued.
    queued_at: String,
    /// Attempts that counted so far.
    attempts: u32,
    /// Why it waits.
    waiting: String,
}

impl From<&QueuedView> for Waiting {
    fn from(q: &QueuedView) -> Waiting {
        Waiting {
            id: q.commit.as_str().to_owned(),
            branch: q.branch.clone(),
            queued_at: rfc3339_ms(q.queued_at_ms),
            attempts: q.attempts,
            waiting: q.waiting.clone(),
        }
    }
}

/// One registered runner.
#[derive(Serialize, ToSchema)]
pub(crate) struct Runner {
    /// The dispatcher's name for its registration.
    id: u64,
    /// Where it listens.
    addr: String,
    /// `idle`, `busy` or `paused`.
    state: &'static str,
    /// The commit it runs, when busy.
    commit: Option<String>,
    /// Why it is paused.
    reason: Option<String>,
}

impl From<&RunnerView> for Runner {
    fn from(r: &RunnerView) -> Runner {
        let (state, commit, reason) = match &r.state {
            RunnerState::Idle => ("idle", None, None),
            RunnerState::Busy { commit, .. } => ("busy", Some(commit.as_str().to_owned()), None),
            RunnerState::Paused { reason } => ("paused", None, Some(reason.clone())),
        };
        Runner {
            id: r.id.0,
            addr: r.addr.clone(),
            state,
            commit,
            reason,
        }
    }
}

/// The answer to a submission.
#[derive(Serialize, ToSchema)]
pub(crate) struct Submitted {
    /// 1 when the commit was queued now, else 0.
    queued: u32,
    /// 1 when it was already queued, running or (without `rerun`) finished.
    known: u32,
}

/// The answer to a cancel.
#[derive(Serialize, ToSchema)]
pub(crate) struct Cancelled {
    /// The commit's state when the cancel arrived.
    was: String,
}

/// Filters and paging of `GET /runs`.
#[derive(Deserialize, IntoParams)]
pub(crate) struct RunsParams {
    /// Only runs in this state: queued, running, success, failure, error, cancelled.
    status: Option<String>,
    /// Only runs of this branch.
    branch: Option<String>,
    /// At most this many (1 to 500; 50 by default).
    limit: Option<u32>,
    /// Skip this many of the newest.
    offset: Option<u64>,
}

/// Options of `POST /run/{sha}`.
#[derive(Deserialize, IntoParams)]
pub(crate) struct SubmitParams {
    /// Put the commit at the front of the queue.
    #[serde(default)]
    front: bool,
    /// Run it again if it already finished.
    #[serde(default)]
    rerun: bool,
    /// The branch to record.
    branch: Option<String>,
}

/// Builds a run query from the parameters.
pub(crate) fn run_query(p: &RunsParams) -> Result<RunQuery, ApiError> {
    let state = match p.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<RunState>().map_err(ApiError::BadRequest)?),
        None => None,
    };
    let branch = p.branch.clone().filter(|b| !b.is_empty());
    if branch
        .as_deref()
        .is_some_and(|b| !crate::dispatcher::client::usable_branch(b))
    {
        return Err(ApiError::BadRequest("unusable branch name".into()));
    }
    Ok(RunQuery {
        state,
        branch,
        limit: p.limit.unwrap_or(50).clamp(1, MAX_LIMIT),
        offset: p.offset.unwrap_or(0),
    })
}

/// Asks the core for a page of runs.
pub(crate) async fn page(app: &App, q: RunQuery) -> Result<(u64, Vec<RunSummary>), ApiError> {
    match app.ask(ToDispatcher::Runs(q)).await? {
        FromDispatcher::Runs { total, runs } => Ok((total, runs)),
        other => Err(super::unexpected(&other)),
    }
}

/// The runs, newest first.
#[utoipa::path(get, tag = "tinyci", path = "/runs", params(RunsParams),
    responses((status = 200, body = RunPage), (status = 400, body = ErrorBody)))]
pub(crate) async fn runs(
    State(app): State<App>,
    Q(p): Q<RunsParams>,
) -> Result<Json<RunPage>, ApiError> {
    let (total, runs) = page(&app, run_query(&p)?).await?;
    Ok(Json(RunPage {
        total,
        data: runs.iter().map(Run::from).collect(),
    }))
}

/// Whether the client asked for a page rather than JSON (a browser does).
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// One run, by id or unique prefix: JSON, or the run's page for a browser.
#[utoipa::path(get, tag = "tinyci", path = "/run/{sha}",
    params(("sha" = String, Path, description = "a commit id or a unique prefix of one (4+ hex digits)")),
    responses((status = 200, body = RunFull), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn run(
    State(app): State<App>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let html = wants_html(&headers);
    let detail = match app.run(&sha).await {
        Ok(d) => d,
        Err(e) if html => return Ok(super::pages::error_page(e)),
        Err(e) => return Err(e),
    };
    if html {
        return Ok(super::pages::run_page(&app, &detail).await);
    }
    Ok(Json(RunFull::from(&detail)).into_response())
}

/// The queue, next first, with why each commit waits.
#[utoipa::path(get, tag = "tinyci", path = "/queue", responses((status = 200, body = Vec<Waiting>)))]
pub(crate) async fn queue(State(app): State<App>) -> Result<Json<Vec<Waiting>>, ApiError> {
    let s = app.status().await?;
    Ok(Json(s.queue.iter().map(Waiting::from).collect()))
}

/// The registered runners.
#[utoipa::path(get, tag = "tinyci", path = "/runners", responses((status = 200, body = Vec<Runner>)))]
pub(crate) async fn runners(State(app): State<App>) -> Result<Json<Vec<Runner>>, ApiError> {
    let s = app.status().await?;
    Ok(Json(s.runners.iter().map(Runner::from).collect()))
}

/// Submits a commit (or runs a finished one again with `rerun`). Needs the bearer token
/// when the dispatcher has one.
#[utoipa::path(post, tag = "tinyci", path = "/run/{sha}",
    params(("sha" = String, Path, description = "the full commit id"), SubmitParams),
    security(("bearer" = [])),
    responses((status = 202, body = Submitted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn submit(
    State(app): State<App>,
    Path(sha): Path<String>,
    Q(p): Q<SubmitParams>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Submitted>), ApiError> {
    app.authorize(&headers)?;
    let commit = full_commit(&sha)?;
    let (reply, answer) = oneshot::channel();
    app.feed(Event::Submit {
        commits: vec![commit],
        branch: p
            .branch
            .filter(|b| crate::dispatcher::client::usable_branch(b)),
        front: p.front,
        rerun: p.rerun,
        reply,
    })
    .await?;
    match answer.await.map_err(|_| ApiError::Unavailable)? {
        FromDispatcher::Submitted { queued, known } => {
            Ok((StatusCode::ACCEPTED, Json(Submitted { queued, known })))
        }
        FromDispatcher::Error { reason } => Err(ApiError::Core(reason)),
        other => Err(super::unexpected(&other)),
    }
}

/// Cancels a queued or running commit. Needs the bearer token when the dispatcher has one.
#[utoipa::path(post, tag = "tinyci", path = "/run/{sha}/cancel",
    params(("sha" = String, Path, description = "the full commit id")),
    security(("bearer" = [])),
    responses((status = 200, body = Cancelled), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn cancel(
    State(app): State<App>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Cancelled>, ApiError> {
    app.authorize(&headers)?;
    let commit = full_commit(&sha)?;
    match app.ask(ToDispatcher::Cancel { commit }).await? {
        FromDispatcher::Cancelled { was } => Ok(Json(Cancelled {
            was: was.as_str().to_owned(),
        })),
        other => Err(super::unexpected(&other)),
    }
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "tinyci dispatcher", description = "Runs, queue, runners, logs and events of a tinyci dispatcher."),
    paths(runs, run, queue, runners, submit, cancel, super::log::raw_log, super::log::events,
          super::metrics::metrics, super::pages::badge),
    components(schemas(Run, RunPage, RunFull, Step, Attempt, Waiting, Runner, Submitted, Cancelled, ErrorBody)),
    modifiers(&BearerAuth)
)]
pub(crate) struct ApiDoc;
