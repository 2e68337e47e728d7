//! The live pages in a real browser: headless Chromium driven through chromedriver
//! (Debian's `chromium` and `chromium-driver`). One test, one browser: the run list shows
//! a new commit and turns it green without a reload; a running commit's page receives its
//! log lines as they are written; a `#L` link marks its line.
//!
//! With `TINYCI_SCREENSHOT=FILE`, the finished run's page is also saved as a PNG there
//! (the README's screenshot).

mod http_common;

use std::future::Future;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use http_common::*;
use serde_json::json;
use testkit::*;

/// chromedriver in a process group of its own (with the browser it starts), killed whole
/// on drop.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Result<Driver> {
        // chromedriver has no "any port": take a free one and hand it over.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let profile = tempfile::Builder::new()
            .prefix("tinyci-chromium-")
            .tempdir()?;
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context(
                "starting chromedriver: install Debian's chromium and chromium-driver (see README)",
            )?;
        let d = Driver {
            child,
            port,
            _profile: profile,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every browser process it started.
        let pgid = self.child.id() as i32;
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Runs one browser command to completion.
fn b<F: Future>(rt: &tokio::runtime::Runtime, f: F) -> F::Output {
    rt.block_on(f)
}

/// Polls `f` (a browser query) until it returns `Some`, within the test deadline.
fn until<T, F, Fut>(rt: &tokio::runtime::Runtime, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = rt.block_on(f())? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn text_of(c: &Client, css: &str) -> Result<Option<String>> {
    let found = match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await,
        Err(e) => Err(e),
    };
    match found {
        Ok(t) => Ok(Some(t)),
        // Not there (yet), or replaced by the page between finding and reading it.
        Err(fantoccini::error::CmdError::Standard(e))
            if matches!(
                e.error,
                fantoccini::error::ErrorStatus::NoSuchElement
                    | fantoccini::error::ErrorStatus::StaleElementReference
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

async fn count(c: &Client, css: &str) -> Result<usize> {
    Ok(c.find_all(Locator::Css(css)).await?.len())
}

/// Whether the page is still the one `mark` marked (it was not reloaded).
async fn still_marked(c: &Client) -> Result<bool> {
    Ok(c.execute("return window.__tinyci_mark === 1;", vec![])
        .await?
        == json!(true))
}

async fn mark(c: &Client) -> Result<()> {
    c.execute("window.__tinyci_mark = 1;", vec![]).await?;
    Ok(())
}

#[test]
fn pages_update_live_in_a_real_browser() -> Result<()> {
    let w = start(testkit::bins!(), Opts::default(), &[])?;
    let head = w.c.master.head()?;
    w.wait_status(&head, "success")?;

    let driver = Driver::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1000,800",
                         format!("--user-data-dir={}", driver._profile.path().display())] }),
    );
    let c: Client = b(
        &rt,
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port)),
    )
    .context("opening a browser session")?;

    // The list: a new commit appears and turns green, without a reload.
    b(&rt, c.goto(&w.url("/")))?;
    b(&rt, mark(&c))?;
    until(&rt, "the first run on the list", || async {
        text_of(&c, &format!("#run-{head} .st")).await
    })?;
    let sha =
        w.c.commit("listed", &[(".tinyci.toml", &slow_lines_step(10, "0.1"))])?;
    let row = format!("#run-{sha} .st");
    until(&rt, "the new commit on the list", || async {
        text_of(&c, &row).await
    })?;
    until(&rt, "the new commit turning green", || async {
        Ok(text_of(&c, &row).await?.filter(|s| s == "success"))
    })?;
    assert!(b(&rt, still_marked(&c))?, "the list page was reloaded");

    // A running commit's page: lines arrive while it runs.
    let slow =
        w.c.commit("watched", &[(".tinyci.toml", &slow_lines_step(60, "0.1"))])?;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, v) = w.get_json(&format!("/run/{slow}"))?;
        if v["status"] == "running" && v["log_bytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{slow} never showed output while running: {v}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    b(&rt, c.goto(&w.url(&format!("/run/{slow}"))))?;
    b(&rt, mark(&c))?;
    let at_load = b(&rt, count(&c, "#log .line"))?;
    assert_eq!(b(&rt, text_of(&c, "#status"))?.as_deref(), Some("running"));
    until(&rt, "log lines arriving", || async {
        let n = count(&c, "#log .line").await?;
        Ok((n > at_load + 2).then_some(n))
    })?;
    until(&rt, "the run page turning green", || async {
        Ok(text_of(&c, "#status").await?.filter(|s| s == "success"))
    })?;
    let lines = b(&rt, count(&c, "#log .line"))?;
    let log = std::fs::read_to_string(w.c.results.join(format!("{slow}.log")))?;
    assert_eq!(lines, log.lines().count(), "every line once");
    assert!(b(&rt, still_marked(&c))?, "the run page was reloaded");
    // Lines that arrived live are numbered on from the page's own.
    let last = format!("#L{lines} code");
    let text = b(&rt, text_of(&c, &last))?.unwrap_or_default();
    assert!(text.ends_with("line 60 ok <i>&</i>"), "{text:?}");
    until(&rt, "the steps table filled in", || async {
        Ok(text_of(&c, "#steps tbody")
            .await?
            .filter(|t| t.contains("lines")))
    })?;

    // A `#L` link: clicking a number marks its line, and a link opened afresh lands on it.
    b(&rt, async {
        c.find(Locator::Css("#L3 a.ln")).await?.click().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let url = b(&rt, c.current_url())?;
    assert_eq!(url.fragment(), Some("L3"));
    let target = |c: &Client| {
        let c = c.clone();
        async move {
            let v = c
                .execute(
                    "const t = document.querySelector(':target'); return t ? t.id : null;",
                    vec![],
                )
                .await?;
            Ok::<_, anyhow::Error>(v)
        }
    };
    assert_eq!(b(&rt, target(&c))?, json!("L3"));
    b(&rt, c.goto(&w.url(&format!("/run/{slow}#L42"))))?;
    assert_eq!(b(&rt, target(&c))?, json!("L42"));
    let colour = b(
        &rt,
        c.execute(
            "return getComputedStyle(document.getElementById('L42')).backgroundColor;",
            vec![],
        ),
    )?;
    assert_ne!(
        colour,
        json!("rgba(0, 0, 0, 0)"),
        "the linked line is not highlighted"
    );

    if let Some(path) = std::env::var_os("TINYCI_SCREENSHOT") {
        b(&rt, c.goto(&w.url(&format!("/run/{slow}"))))?;
        let png = b(&rt, c.screenshot())?;
        std::fs::write(&path, png)?;
    }
    b(&rt, c.close())?;
    drop(driver);
    Ok(())
}
