//! The pages: the live run list at `/` and a run's page (steps and its log with numbered,
//! linkable lines), server-rendered with maud (which escapes everything it is given) and
//! brought up to date by a few lines of plain JavaScript over `/events`. Without
//! JavaScript they show the state as of loading. Also the status badge.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;
use tinyci_proto::{RunDetail, RunQuery, RunState, RunSummary, RunnerState};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::IntoParams;

use super::api::{page, rfc3339_ms, step_word};
use super::log::line_html;
use super::{ApiError, App, Q};
use crate::client::cli::{ago, human_duration};
use crate::results;

/// A run's page shows at most this much of the end of its log; the rest is behind the
/// raw log link.
const PAGE_LOG_MAX: u64 = 2 * 1024 * 1024;

const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("app.js");

/// The stylesheet.
pub(crate) async fn style() -> Response {
    static_text(STYLE, "text/css; charset=utf-8")
}

/// The script of both pages.
pub(crate) async fn script() -> Response {
    static_text(SCRIPT, "text/javascript; charset=utf-8")
}

fn static_text(body: &'static str, kind: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

fn layout(title: &str, body: Markup) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href="/style.css";
                script src="/app.js" defer {}
            }
            body { (body) }
        }
    };
    let mut resp = Html(page.into_string()).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn badge_class(s: RunState) -> &'static str {
    s.as_str()
}

fn run_row(r: &RunSummary) -> Markup {
    let id = r.commit.as_str();
    html! {
        tr id={ "run-" (id) } data-status=(r.state.as_str()) {
            td.id { a href={ "/run/" (id) } { code { (r.commit.short()) } } }
            td { span class={ "st " (badge_class(r.state)) } { (r.state.as_str()) } }
            td.branch { (r.branch.as_deref().unwrap_or("")) }
            td.when title=(rfc3339_ms(r.queued_at_ms)) { (ago(r.queued_at_ms)) }
            td.failed { (r.failed_steps.join(", ")) }
        }
    }
}

/// The live page: the newest runs, the queue and the runners.
pub(crate) async fn index(State(app): State<App>) -> Result<Response, ApiError> {
    let status = app.status().await?;
    let (total, runs) = page(
        &app,
        RunQuery {
            limit: super::live::LIVE_RUNS,
            ..RunQuery::default()
        },
    )
    .await?;
    let body = html! {
        header {
            h1 { a href="/" { "tinyci" } }
            nav { a href="/docs" { "API" } " · " a href="/metrics" { "metrics" } }
        }
        @if let Some(t) = &status.refusing {
            p.warn { "The dispatcher refuses new commits: " (t) }
        }
        main #index {
            section {
                h2 { "Runs " small { "(" (total) " in all)" } }
                table.runs {
                    thead { tr { th { "commit" } th { "status" } th.branch { "branch" } th.when { "queued" } th.failed { "failed steps" } } }
                    tbody #runs {
                        @for r in &runs { (run_row(r)) }
                    }
                }
                @if runs.is_empty() { p #empty { "No runs yet." } }
            }
            section.side {
                h2 { "Queue " small { "(" (status.queue.len()) ")" } }
                ul.queue {
                    @for q in &status.queue {
                        li { a href={ "/run/" (q.commit.as_str()) } { code { (q.commit.short()) } } " " span.why { (q.waiting) } }
                    }
                    @if status.queue.is_empty() { li.none { "empty" } }
                }
                h2 { "Runners " small { "(" (status.runners.len()) ")" } }
                ul.runners {
                    @for r in &status.runners {
                        li {
                            code { (r.addr) } " "
                            @match &r.state {
                                RunnerState::Idle => span.st.idle { "idle" },
                                RunnerState::Busy { commit, .. } => span.st.running { "running " a href={ "/run/" (commit.as_str()) } { (commit.short()) } },
                                RunnerState::Paused { reason } => span.st.paused title=(reason) { "paused" },
                            }
                        }
                    }
                    @if status.runners.is_empty() { li.none { "none" } }
                }
            }
        }
    };
    Ok(layout("tinyci", body))
}

/// The end of a run's log as the page shows it: (lines, number of the first, offset just
/// past the last whole line, whether the beginning was left out).
async fn page_log(
    path: &std::path::Path,
    len: u64,
    finished: bool,
) -> (Vec<String>, u64, u64, bool) {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return (Vec::new(), 1, 0, false);
    };
    let start = len.saturating_sub(PAGE_LOG_MAX);
    // Line numbers count from the file's start: count the newlines of the part left out.
    let mut first_line = 1u64;
    if start > 0 {
        let mut left = start;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            match f.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first_line += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                    left -= n as u64;
                }
            }
        }
    }
    if f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return (Vec::new(), 1, 0, false);
    }
    let mut data = Vec::new();
    if (&mut f)
        .take(len - start)
        .read_to_end(&mut data)
        .await
        .is_err()
    {
        return (Vec::new(), 1, 0, false);
    }
    let skipped = start > 0;
    let mut data_start = start;
    if skipped {
        // Start at a line's beginning.
        match data.iter().position(|&b| b == b'\n') {
            Some(i) => {
                data.drain(..=i);
                data_start += i as u64 + 1;
                first_line += 1;
            }
            None => {
                data_start += data.len() as u64;
                data.clear();
            }
        }
    }
    // A running log is shown up to its last whole line: the stream goes on from there.
    if !finished {
        let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        data.truncate(keep);
    }
    let end = data_start + data.len() as u64;
    let text = String::from_utf8_lossy(&data);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let lines = if data.is_empty() {
        Vec::new()
    } else {
        text.split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
            .collect()
    };
    (lines, first_line, end, skipped)
}

/// An error, for a browser: the same status code, in words on a page.
pub(crate) fn error_page(e: ApiError) -> Response {
    let message = e.to_string();
    let status = e.into_response().status();
    let body = html! {
        header { h1 { a href="/" { "tinyci" } } }
        main { h2 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) } p { (message) } }
    };
    let mut resp = layout(&format!("{} · tinyci", status.as_u16()), body);
    *resp.status_mut() = status;
    resp
}

/// A run's page.
pub(crate) async fn run_page(app: &App, d: &RunDetail) -> Response {
    let s = &d.summary;
    let id = s.commit.as_str();
    let path = results::log_path(&app.core.results_dir, &s.commit);
    let len = tokio::fs::metadata(&path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let finished = s.state.is_finished();
    let (lines, first, offset, skipped) = page_log(&path, len, finished).await;
    let took: u64 = d.steps.iter().map(|st| st.duration_ms).sum();
    let body = html! {
        header {
            h1 { a href="/" { "tinyci" } }
            nav { a href={ "/run/" (id) "/log" } { "raw log" } }
        }
        main #run data-sha=(id) data-status=(s.state.as_str()) data-offset=(offset)
            data-next-line=(first + lines.len() as u64) {
            h2 {
                code.sha { (id) }
                " " span #status class={ "st " (badge_class(s.state)) } { (s.state.as_str()) }
            }
            dl.facts {
                @if let Some(b) = &s.branch { dt { "branch" } dd { (b) } }
                dt { "queued" } dd title=(rfc3339_ms(s.queued_at_ms)) { (ago(s.queued_at_ms)) }
                @if let Some(r) = &d.runner { dt { "runner" } dd { code { (r) } } }
                dt { "attempts" } dd { (s.attempts) }
                @if !d.steps.is_empty() { dt { "took" } dd { (human_duration(took)) } }
                @if let Some(e) = &d.error { dt { "error" } dd.error { (e) } }
            }
            table #steps.steps {
                thead { tr { th { "step" } th { "status" } th { "exit" } th { "time" } } }
                tbody {
                    @for st in &d.steps {
                        tr {
                            td { (st.name) }
                            td { span class={ "st " (step_word(st.status)) } { (step_word(st.status)) } }
                            td { @if let Some(c) = st.exit_code { (c) } }
                            td { (human_duration(st.duration_ms)) }
                        }
                    }
                }
            }
            div.logbar {
                h3 { "Log" }
                label #followbox hidden { input #follow type="checkbox" checked; " follow" }
            }
            @if skipped {
                p.note { "The beginning of this log is left out; " a href={ "/run/" (id) "/log" } { "the raw log" } " has all of it." }
            }
            div #log.log {
                @for (i, l) in lines.iter().enumerate() {
                    @let n = first + i as u64;
                    div.line id={ "L" (n) } {
                        a.ln href={ "#L" (n) } { (n) }
                        code { (PreEscaped(line_html(l))) }
                    }
                }
            }
        }
    };
    layout(&format!("{} · tinyci", s.commit.short()), body)
}

/// Options of `GET /badge.svg`.
#[derive(Deserialize, IntoParams)]
pub(crate) struct BadgeParams {
    /// The branch (all runs by default).
    branch: Option<String>,
}

/// How many of the newest runs the badge looks through for a finished one.
const BADGE_SCAN: u32 = 200;

/// A status badge for the newest finished run (of a branch).
#[utoipa::path(get, tag = "tinyci", path = "/badge.svg", params(BadgeParams),
    responses((status = 200, description = "an SVG badge", content_type = "image/svg+xml")))]
pub(crate) async fn badge(
    State(app): State<App>,
    Q(p): Q<BadgeParams>,
) -> Result<Response, ApiError> {
    let branch = p.branch.filter(|b| !b.is_empty());
    let (_, runs) = page(
        &app,
        RunQuery {
            branch,
            limit: BADGE_SCAN,
            ..RunQuery::default()
        },
    )
    .await?;
    let state = runs.iter().map(|r| r.state).find(|s| s.is_finished());
    let (word, colour) = match state {
        Some(RunState::Success) => ("passing", "#2ea043"),
        Some(RunState::Failure) => ("failing", "#d1242f"),
        Some(RunState::Error) => ("error", "#d1242f"),
        Some(RunState::Cancelled) => ("cancelled", "#6e7781"),
        _ => ("unknown", "#6e7781"),
    };
    // Verdana 11px is about 7 px a letter: enough for a fixed set of words.
    let left = 46u32;
    let right = 12 + 7 * word.len() as u32;
    let width = left + right;
    let svg = html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(width) height="20" role="img" aria-label={ "tinyci: " (word) } {
            title { "tinyci: " (word) }
            rect width=(left) height="20" fill="#555" {}
            rect x=(left) width=(right) height="20" fill=(colour) {}
            g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" {
                text x=(left / 2) y="14" { "tinyci" }
                text x=(left + right / 2) y="14" { (word) }
            }
        }
    };
    let mut resp = svg.into_string().into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}
