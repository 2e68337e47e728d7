//! Logs and events: `GET /run/{sha}/log` (a byte range, or followed until the run ends)
//! and `GET /events` (Server-Sent Events: the live run list, or one run's status and log
//! lines with the log byte offset as event id).
//!
//! Every follower reads `<sha>.log` from its own offset, asks the core for the run's state
//! first and reads the file second (once the run is seen finished, everything it wrote is
//! in the file), and sleeps on the core's change notification: no follower has a buffer of
//! its own beyond the one chunk it is sending.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tinyci_proto::{CommitId, RunState};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};

use super::api::Run;
use super::live::Snapshot;
use super::{ApiError, App, ErrorBody, Q};
use crate::results;

/// The most log bytes read (and sent) at once.
const CHUNK: usize = 64 * 1024;

/// A follower looks at the file this often even without a notification (a safety net).
const RECHECK: Duration = Duration::from_secs(1);

/// Resolves a path segment to a commit: a full id as is, a prefix through the core.
async fn commit_of(app: &App, sha: &str) -> Result<CommitId, ApiError> {
    match CommitId::parse(sha) {
        Ok(c) => Ok(c),
        Err(_) => Ok(app.run(sha).await?.summary.commit),
    }
}

/// Reads up to `max` bytes of `path` from `offset`; empty at (or past) the end or when
/// there is no file yet.
async fn read_at(path: &std::path::Path, offset: u64, max: usize) -> Vec<u8> {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::with_capacity(max.min(CHUNK));
    match (&mut f).take(max as u64).read_to_end(&mut buf).await {
        Ok(_) => buf,
        Err(_) => Vec::new(),
    }
}

/// One reader of one run's log, from its own offset.
struct Follower {
    app: App,
    commit: CommitId,
    path: PathBuf,
    offset: u64,
    changed: watch::Receiver<u64>,
    /// The state as last asked (`None` before the first ask).
    state: Option<RunState>,
    /// Whether the state must be asked again before the next read at the end.
    stale: bool,
}

/// What a follower found next.
enum Next {
    /// Bytes from the log.
    Data(Vec<u8>),
    /// The state changed (and is now this); the log has not reached its end for it yet.
    State(RunState),
    /// The run is over and every byte was read.
    End(RunState),
}

impl Follower {
    fn new(app: &App, commit: CommitId, offset: u64) -> Follower {
        Follower {
            path: results::log_path(&app.core.results_dir, &commit),
            app: app.clone(),
            commit,
            offset,
            changed: app.core.log_changed.clone(),
            state: None,
            stale: true,
        }
    }

    /// The next bytes (at most `max`, cut after the last whole line when `lines` and the
    /// run goes on), a state change, or the end; `None` when the dispatcher stops.
    async fn next(&mut self, max: usize, lines: bool) -> Option<Next> {
        loop {
            if self.stale {
                self.changed.borrow_and_update();
                let state = match self.app.state_of(&self.commit).await {
                    Ok(Some(s)) => s,
                    // A log without a run (left by an older results directory).
                    Ok(None) => RunState::Error,
                    Err(_) => return None,
                };
                self.stale = false;
                if self.state != Some(state) {
                    self.state = Some(state);
                    return Some(Next::State(state));
                }
            }
            let state = self.state.unwrap_or(RunState::Queued);
            let mut data = read_at(&self.path, self.offset, max).await;
            if lines && !state.is_finished() {
                match data.iter().rposition(|&b| b == b'\n') {
                    Some(i) => data.truncate(i + 1),
                    // One line longer than a chunk goes out in pieces.
                    None if data.len() == max => {}
                    None => data.clear(),
                }
            }
            if !data.is_empty() {
                self.offset += data.len() as u64;
                return Some(Next::Data(data));
            }
            if state.is_finished() {
                return Some(Next::End(state));
            }
            tokio::select! {
                _ = self.app.shutdown.cancelled() => return None,
                res = self.changed.changed() => if res.is_err() { return None },
                () = tokio::time::sleep(RECHECK) => {}
            }
            self.stale = true;
        }
    }
}

/// Options of `GET /run/{sha}/log`.
#[derive(Deserialize, IntoParams)]
pub(crate) struct LogParams {
    /// Keep the response open and send output as the run writes it, until it ends.
    #[serde(default)]
    follow: Option<String>,
}

/// A `Range: bytes=N-` or `bytes=N-M` header: `Ok(None)` without one (or one this server
/// ignores, as HTTP allows: several ranges, other units, suffixes), `Err` for a start no
/// log can reach.
fn parse_range(headers: &HeaderMap) -> Result<Option<(u64, Option<u64>)>, ()> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = (start.trim(), end.trim());
    if start.is_empty() || !start.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    // All digits, yet not a u64: a start past any log.
    let start: u64 = start.parse().map_err(|_| ())?;
    let end = if end.is_empty() {
        None
    } else if end.bytes().all(|b| b.is_ascii_digit()) {
        match end.parse::<u64>() {
            Ok(e) if e >= start => Some(e),
            Ok(_) => return Ok(None),
            Err(_) => None, // past any end: to the end
        }
    } else {
        return Ok(None);
    };
    Ok(Some((start, end)))
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "yes" | ""))
}

/// The raw log: whole, a byte range (`Range: bytes=N-`), or followed (`?follow=1`).
#[utoipa::path(get, tag = "tinyci", path = "/run/{sha}/log",
    params(("sha" = String, Path, description = "a commit id or a unique prefix of one"), LogParams,
           ("Range" = Option<String>, Header, description = "bytes=N- or bytes=N-M")),
    responses((status = 200, description = "the log", content_type = "text/plain"),
              (status = 206, description = "the requested bytes", content_type = "text/plain"),
              (status = 404, body = ErrorBody), (status = 416, body = ErrorBody)))]
pub(crate) async fn raw_log(
    State(app): State<App>,
    Path(sha): Path<String>,
    Q(p): Q<LogParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let commit = commit_of(&app, &sha).await?;
    let path = results::log_path(&app.core.results_dir, &commit);
    let follow = truthy(p.follow.as_deref());
    let len = match tokio::fs::metadata(&path).await {
        Ok(m) => m.len(),
        Err(_) => match app.state_of(&commit).await? {
            Some(_) => 0,
            None => return Err(ApiError::NotFound(format!("no run of {commit} is known"))),
        },
    };
    let range = parse_range(&headers).map_err(|()| ApiError::RangeNotSatisfiable { len })?;
    let text = HeaderValue::from_static("text/plain; charset=utf-8");
    if follow {
        let start = range.map(|(s, _)| s).unwrap_or(0);
        let follower = Follower::new(&app, commit, start);
        let body = stream::unfold(follower, |mut f| async move {
            loop {
                match f.next(CHUNK, false).await? {
                    Next::Data(d) => return Some((Ok::<_, Infallible>(Bytes::from(d)), f)),
                    Next::State(_) => continue,
                    Next::End(_) => return None,
                }
            }
        });
        let mut resp = Response::new(Body::from_stream(body));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, text);
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // nginx: do not buffer a followed log.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        return Ok(resp);
    }
    let (start, last, status) = match range {
        None => (0, len.saturating_sub(1), StatusCode::OK),
        Some((s, _)) if s >= len => return Err(ApiError::RangeNotSatisfiable { len }),
        Some((s, e)) => (
            s,
            e.unwrap_or(u64::MAX).min(len - 1),
            StatusCode::PARTIAL_CONTENT,
        ),
    };
    let count = if len == 0 { 0 } else { last - start + 1 };
    let body = stream::unfold((path, start, count), |(path, at, left)| async move {
        if left == 0 {
            return None;
        }
        let max = left.min(CHUNK as u64) as usize;
        let data = read_at(&path, at, max).await;
        if data.is_empty() {
            return None; // the file shrank: never, but end rather than spin
        }
        let n = data.len() as u64;
        Some((
            Ok::<_, Infallible>(Bytes::from(data)),
            (path, at + n, left - n),
        ))
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, text);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{last}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

/// Options of `GET /events`.
#[derive(Deserialize, IntoParams)]
pub(crate) struct EventsParams {
    /// Follow this run (id or unique prefix): its status and log lines. Without it, the
    /// stream carries the status changes of the newest runs.
    run: Option<String>,
    /// With `run`: also send each line rendered as HTML (ANSI colours, escaped).
    html: Option<String>,
    /// With `run`: start at this log byte offset (a `Last-Event-ID` header wins).
    offset: Option<u64>,
}

/// The data of a `log` event.
#[derive(Serialize, ToSchema)]
pub(crate) struct LogEvent {
    /// Byte offset of the first line in the log.
    offset: u64,
    /// The lines (without their newline; the last one may be unfinished only at the end).
    lines: Vec<String>,
    /// The same lines as HTML, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    html: Option<Vec<String>>,
}

/// The data of a `status` or `end` event of one run.
#[derive(Serialize, ToSchema)]
pub(crate) struct StatusEvent {
    /// The run's status.
    status: String,
}

/// One line of log as HTML: colours from its ANSI codes, everything else escaped.
pub(crate) fn line_html(line: &str) -> String {
    ansi_to_html::convert(line).unwrap_or_else(|_| maud::html! { (line) }.into_string())
}

fn log_event(offset: u64, data: &[u8], html: bool) -> LogEvent {
    let text = String::from_utf8_lossy(data);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let lines: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
        .collect();
    let html = html.then(|| lines.iter().map(|l| line_html(l)).collect());
    LogEvent {
        offset,
        lines,
        html,
    }
}

fn json_event(kind: &'static str, data: &impl Serialize) -> SseEvent {
    SseEvent::default()
        .event(kind)
        .data(serde_json::to_string(data).unwrap_or_default())
}

/// Server-Sent Events: the live run list (`event: run`, data a run as `/runs` lists it),
/// or, with `?run=SHA`, that run's `status` changes, its `log` lines (event id = the log
/// byte offset after them: reconnect with `Last-Event-ID` and no line comes twice) and a
/// last `end` event.
#[utoipa::path(get, tag = "tinyci", path = "/events", params(EventsParams,
        ("Last-Event-ID" = Option<String>, Header, description = "with run: resume after this log byte offset")),
    responses((status = 200, description = "an event stream", content_type = "text/event-stream"),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn events(
    State(app): State<App>,
    Q(p): Q<EventsParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mut resp = match p.run.as_deref() {
        Some(sha) => {
            let commit = commit_of(&app, sha).await?;
            let path = results::log_path(&app.core.results_dir, &commit);
            if app.state_of(&commit).await?.is_none() && tokio::fs::metadata(&path).await.is_err() {
                return Err(ApiError::NotFound(format!("no run of {commit} is known")));
            }
            let offset = headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .or(p.offset)
                .unwrap_or(0);
            let html = truthy(p.html.as_deref());
            Sse::new(run_events(&app, commit, offset, html))
                .keep_alive(KeepAlive::new().interval(app.keep_alive))
                .into_response()
        }
        None => Sse::new(live_events(&app).await?)
            .keep_alive(KeepAlive::new().interval(app.keep_alive))
            .into_response(),
    };
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

fn run_events(
    app: &App,
    commit: CommitId,
    offset: u64,
    html: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let follower = Follower::new(app, commit, offset);
    stream::unfold(Some(follower), move |f| async move {
        let mut f = f?;
        let start = f.offset;
        let ev = match f.next(CHUNK, true).await? {
            Next::Data(d) => {
                json_event("log", &log_event(start, &d, html)).id(f.offset.to_string())
            }
            Next::State(s) => json_event(
                "status",
                &StatusEvent {
                    status: s.as_str().to_owned(),
                },
            ),
            Next::End(s) => {
                let ev = json_event(
                    "end",
                    &StatusEvent {
                        status: s.as_str().to_owned(),
                    },
                );
                return Some((Ok(ev), None));
            }
        };
        Some((Ok(ev), Some(f)))
    })
}

/// What a live-list client last sent of each run.
type Sent = HashMap<CommitId, Run>;

/// The runs of `snap` that differ from what was sent, and remembers them.
fn changes(sent: &mut Sent, snap: &Snapshot) -> Vec<SseEvent> {
    let mut out = Vec::new();
    // Oldest first, so a page inserting each at the top ends newest first.
    for r in snap.runs.iter().rev() {
        let run = Run::from(r);
        if sent.get(&r.commit) != Some(&run) {
            out.push(json_event("run", &run));
            sent.insert(r.commit.clone(), run);
        }
    }
    // Forget what fell off the list, so memory stays one list long.
    if sent.len() > snap.runs.len() * 2 {
        let keep: std::collections::HashSet<&CommitId> =
            snap.runs.iter().map(|r| &r.commit).collect();
        sent.retain(|c, _| keep.contains(c));
    }
    out
}

async fn live_events(
    app: &App,
) -> Result<impl Stream<Item = Result<SseEvent, Infallible>>, ApiError> {
    // The shared snapshot: a new client costs the core nothing.
    let mut rx = app.live.subscribe();
    let first: Arc<Snapshot> = rx.borrow_and_update().clone();
    let mut sent = Sent::new();
    let initial = changes(&mut sent, &first);
    let shutdown = app.shutdown.clone();
    let later = stream::unfold(
        (rx, sent, shutdown),
        |(mut rx, mut sent, shutdown)| async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    res = rx.changed() => res.ok()?,
                }
                let snap: Arc<Snapshot> = rx.borrow_and_update().clone();
                let evs = changes(&mut sent, &snap);
                if !evs.is_empty() {
                    return Some((stream::iter(evs), (rx, sent, shutdown)));
                }
            }
        },
    )
    .flatten();
    Ok(stream::iter(initial).chain(later).map(Ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> Result<Option<(u64, Option<u64>)>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h)
    }

    #[test]
    fn ranges_are_parsed_or_ignored_and_huge_starts_refused() {
        assert_eq!(range("bytes=10-"), Ok(Some((10, None))));
        assert_eq!(range("bytes=10-19"), Ok(Some((10, Some(19)))));
        assert_eq!(
            range("bytes=0-99999999999999999999999"),
            Ok(Some((0, None)))
        );
        assert_eq!(range("bytes=99999999999999999999999-"), Err(()));
        assert_eq!(range("bytes=-5"), Ok(None));
        assert_eq!(range("bytes=1-2,4-5"), Ok(None));
        assert_eq!(range("items=1-"), Ok(None));
        assert_eq!(range("bytes=9-3"), Ok(None));
        assert_eq!(parse_range(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn log_events_split_lines_and_escape_html() {
        let ev = log_event(7, b"a <b>\n\x1b[31mred\x1b[0m\n", true);
        assert_eq!(ev.offset, 7);
        assert_eq!(ev.lines, vec!["a <b>", "\x1b[31mred\x1b[0m"]);
        let html = ev.html.unwrap();
        assert_eq!(html[0], "a &lt;b&gt;");
        assert!(
            html[1].contains("red") && html[1].contains("<span"),
            "{}",
            html[1]
        );
    }
}
