//! A full results disk, for real: the dispatcher's results directory on a small tmpfs that
//! the test fills up (blocks, then inodes) while work goes on. Mounting needs root; without
//! it each test says that it did not run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use testkit::*;

fn bins() -> Bins {
    testkit::bins!()
}

/// A tmpfs mounted for one test, unmounted (lazily: processes may still hold files) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs with `options` on `dir`; `None` (and a note) when not root.
    fn mount(dir: &Path, options: &str) -> Result<Option<Tmpfs>> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "NOT RUN: mounting a tmpfs needs root; run the tests as root to cover full disks"
            );
            return Ok(None);
        }
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tinyci-test"])
            .arg(dir)
            .output()?;
        if !out.status.success() {
            bail!("mount: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Some(Tmpfs {
            dir: dir.to_owned(),
        }))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes `dir/filler` until the file system has no room left; returns its path.
fn fill_blocks(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(path)
}

/// Creates empty files in `dir/inodes` until no inode is left; returns the directory.
fn fill_inodes(dir: &Path) -> Result<PathBuf> {
    let sub = dir.join("inodes");
    std::fs::create_dir(&sub)?;
    for n in 0.. {
        match std::fs::File::create(sub.join(n.to_string())) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sub)
}

/// A cluster whose dispatcher keeps its results on a fresh tmpfs mounted with `options`.
fn cluster_on_tmpfs(options: &str) -> Result<Option<(Cluster, Tmpfs)>> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            observer: false,
            ..Opts::default()
        },
    )?;
    if let Some(mut d) = c.dispatcher.take() {
        d.kill();
    }
    let Some(fs) = Tmpfs::mount(&c.results, options)? else {
        return Ok(None);
    };
    c.start_dispatcher("0")?;
    c.add_runner()?;
    c.start_observer()?;
    c.wait_result(&c.master.head()?, WAIT)?;
    Ok(Some((c, fs)))
}

#[test]
fn a_full_results_disk_refuses_submissions_keeps_serving_and_loses_nothing() -> Result<()> {
    let Some((mut c, fs)) = cluster_on_tmpfs("size=4m")? else {
        return Ok(());
    };
    // A running job whose output (2 KiB lines, so they need new pages) meets the full disk.
    let step =
        "i=1; while [ $i -le 40 ]; do printf \"line $i %02000d\\n\" 0; i=$((i+1)); sleep 0.1; done";
    let a = c.commit(
        "long output",
        &[(".tinyci.toml", &spec(&[("out", step, "1m")]))],
    )?;
    c.wait_assigned(&a)?;
    wait_until("the job's first lines in its log", WAIT, || {
        c.log_text(&a).contains("line 2 ")
    })?;
    let filler = fill_blocks(&fs.dir)?;

    // Commits arriving now: 40 of them, so their journal lines cannot all fit in the
    // journal's last page. Light steps, so they run quickly later.
    c.commit(
        "light steps from here",
        &[(".tinyci.toml", "[[steps]]\nname = \"ok\"\nrun = \"true\"\n")],
    )?;
    for n in 0..39 {
        c.commit(&format!("while full {n}"), &[])?;
    }
    let tip = c.master.head()?;
    let d = c.dispatcher();
    d.wait_for(&["cannot write the database"], WAIT)?;
    d.wait_for(&["cannot write the log", &format!("commit={a}")], WAIT)?;
    c.observer.as_ref().expect("observer").wait_for(
        &["submission not acknowledged", "cannot record new commits"],
        WAIT,
    )?;
    c.runners[0].wait_for(&["job finished", &format!("commit={a}")], WAIT)?;
    // Full for a while longer: it keeps serving, refuses, and writes nothing it claims.
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        c.dispatcher.as_mut().expect("dispatcher").is_running(),
        "the dispatcher stopped on a full disk:\n{}",
        c.dispatcher().log()
    );
    ensure!(!c.json_path(&a).exists(), "a result file on a full disk?");
    assert_eq!(
        c.dispatcher()
            .count(&["result file written", &format!("commit={a}")]),
        0
    );

    // Space comes back: without a restart, everything lands.
    std::fs::remove_file(&filler)?;
    let r = c.wait_result(&a, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    let line = c
        .dispatcher()
        .wait_for(&["result file written", &format!("commit={a}")], WAIT)?;
    assert!(c.json_path(&a).exists(), "logged before written: {line}");
    let log = c.log_text(&a);
    assert!(
        log.contains("[tinyci] log truncated:") && log.contains("bytes of output were lost here"),
        "{log}"
    );
    assert!(log.contains("No space left on device"), "{log}");
    c.dispatcher()
        .wait_for(&["the database is writable again"], WAIT)?;
    assert_eq!(c.wait_result(&tip, WAIT)?["status"], "success");
    let d = c.dispatcher();
    assert_eq!(d.count(&["queued", &format!("commit={tip}")]), 1);
    assert_eq!(d.count(&["result file written", &format!("commit={a}")]), 1);
    Ok(())
}

#[test]
fn a_result_file_that_cannot_be_created_is_written_once_it_can() -> Result<()> {
    // Room for data but few inodes: the journal and open logs can still be written, new
    // files (a result's temp file, a new log) cannot.
    let Some((c, fs)) = cluster_on_tmpfs("size=8m,nr_inodes=64")? else {
        return Ok(());
    };
    let inodes = fill_inodes(&fs.dir)?;
    let sha = c.commit(
        "no inode for its files",
        &[(
            ".tinyci.toml",
            &spec(&[("say", "echo hello from the step", "1m")]),
        )],
    )?;
    c.runners[0].wait_for(&["result delivered"], WAIT)?;
    let d = c.dispatcher();
    d.wait_for(
        &["cannot write the result file", &format!("commit={sha}")],
        WAIT,
    )?;
    std::thread::sleep(Duration::from_millis(1000));
    ensure!(!c.json_path(&sha).exists());
    assert_eq!(
        d.count(&["result file written", &format!("commit={sha}")]),
        0
    );

    std::fs::remove_dir_all(&inodes)?;
    let r = c.wait_result(&sha, WAIT)?;
    assert_eq!(r["status"], "success", "{r}");
    d.wait_for(
        &[
            "result file written",
            &format!("commit={sha}"),
            "retried=true",
        ],
        WAIT,
    )?;
    Ok(())
}
