//! Phases 3 and 4: the real dispatcher with simulated runners and a simulated observer
//! that speak the real protocol from inside the bench.

use super::*;

/// A dispatcher of its own in a temp dir; returns it and its address.
pub(crate) fn lone_dispatcher(
    bins: &Bins,
    tmp: &Path,
    heartbeat: &str,
    timeout: &str,
) -> Result<(Proc, String)> {
    let mut cmd = Command::new(&bins.dispatcher);
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--results-dir"])
        .arg(tmp.join("test_results"))
        .args([
            "--heartbeat-interval",
            heartbeat,
            "--heartbeat-timeout",
            timeout,
        ])
        .env_remove("TINYCI_TOKEN");
    let p = Proc::spawn("dispatcher", cmd)?;
    let line = p.wait_for(&["listening", "addr="], WAIT)?;
    let addr = field(&line, "addr").ok_or_else(|| anyhow!("no addr in {line:?}"))?;
    Ok((p, addr))
}

/// The n-th fabricated commit id (40 hex digits, the index in the last 16).
pub(crate) fn fake_commit(n: usize) -> CommitId {
    CommitId::parse(&format!("be4c0000{:016x}{:016x}", 0u64, n as u64)).expect("valid id")
}

pub(crate) fn fake_index(c: &CommitId) -> usize {
    usize::from_str_radix(&c.as_str()[24..], 16).unwrap_or(usize::MAX)
}

/// What one simulated runner saw.
#[derive(Default)]
pub(crate) struct SimLog {
    /// Per `Assign`: commit index, when it arrived, when this runner had become free.
    assigns: Vec<(usize, Instant, Option<Instant>)>,
    last_ack: Option<Instant>,
}

/// Shared by the simulated runners.
pub(crate) struct SimShared {
    pub(crate) registered: AtomicUsize,
    pub(crate) acked: AtomicUsize,
    pub(crate) stop: CancellationToken,
}

pub(crate) async fn connect(addr: &str, role: Role) -> Result<Connection<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut conn = Connection::new(stream);
    conn.client_handshake(role, "").await?;
    Ok(conn)
}

/// A runner that registers as `fake_addr`, answers pings, and finishes every job at once.
pub(crate) async fn sim_runner(
    dispatcher: String,
    fake_addr: String,
    shared: Arc<SimShared>,
) -> Result<SimLog> {
    let mut conn = connect(&dispatcher, Role::Runner).await?;
    conn.send(&ToDispatcher::Register {
        addr: fake_addr,
        held: None,
        paused: None,
    })
    .await?;
    match conn
        .recv_within::<FromDispatcher>(Duration::from_secs(10), "Registered")
        .await?
    {
        FromDispatcher::Registered { .. } => {}
        other => bail!("expected Registered, got {other:?}"),
    }
    shared.registered.fetch_add(1, Ordering::SeqCst);
    let mut log = SimLog::default();
    let mut free_since: Option<Instant> = None;
    loop {
        let msg = tokio::select! {
            _ = shared.stop.cancelled() => return Ok(log),
            msg = conn.recv::<FromDispatcher>() => msg?,
        };
        match msg {
            None => bail!("the dispatcher closed the connection"),
            Some(FromDispatcher::Ping { seq }) => conn.send(&ToDispatcher::Pong { seq }).await?,
            Some(FromDispatcher::Assign { job, commit }) => {
                let at = Instant::now();
                log.assigns.push((fake_index(&commit), at, free_since));
                conn.send(&ToDispatcher::Done {
                    job,
                    report: RunReport {
                        status: RunStatus::Success,
                        steps: Vec::new(),
                        error: None,
                    },
                    log_len: 0,
                })
                .await?;
                free_since = Some(Instant::now());
            }
            Some(FromDispatcher::ResultAck { .. }) => {
                log.last_ack = Some(Instant::now());
                shared.acked.fetch_add(1, Ordering::SeqCst);
            }
            Some(other) => bail!("unexpected {other:?}"),
        }
    }
}

/// Starts `n` simulated runners and waits until all are registered.
pub(crate) async fn start_sims(
    addr: &str,
    n: usize,
    shared: &Arc<SimShared>,
) -> Result<Vec<tokio::task::JoinHandle<Result<SimLog>>>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(sim_runner(
            addr.to_owned(),
            format!("127.0.0.1:{}", 10_000 + i),
            shared.clone(),
        )));
    }
    let deadline = Instant::now() + WAIT;
    while shared.registered.load(Ordering::SeqCst) < n {
        if tasks.iter().any(|t| t.is_finished()) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("simulated runners did not all register within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if shared.registered.load(Ordering::SeqCst) < n {
        // One ended early: surface its error.
        for t in tasks {
            if t.is_finished() {
                t.await??;
            }
        }
        bail!("a simulated runner stopped before registering");
    }
    Ok(tasks)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: the simulated peers take at most one of the two cores.
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// What one capacity run measured.
pub(crate) struct Capacity {
    jobs_per_s: f64,
    assign_p99_ms: f64,
    peak_rss_kb: u64,
    notes: Vec<String>,
}

pub(crate) fn capacity(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
    let main = capacity_run(bins, counts, tmp.path())?;
    scratch.push(tmp);
    report.ms(
        "dispatch_jobs_per_s",
        main.jobs_per_s.round(),
        Some(Target::AtLeast(10_000.0)),
    );
    report.ms(
        "assign_p99_ms",
        main.assign_p99_ms,
        Some(Target::AtMost(5.0)),
    );
    report.int("dispatcher_peak_rss_kb", main.peak_rss_kb, None);
    for n in main.notes {
        report.note(n);
    }
    // A control run with the results on tmpfs separates the file system's share from the
    // dispatcher's own (not a key). `BENCH_NO_CONTROL=1` skips it (alternated A/B runs).
    let shm = Path::new("/dev/shm");
    if fs_of(shm) == "tmpfs" && std::env::var_os("BENCH_NO_CONTROL").is_none() {
        let tmp = tempfile::Builder::new()
            .prefix("tinyci-bench-")
            .tempdir_in(shm)?;
        let control = capacity_run(bins, counts, tmp.path())?;
        drop(tmp); // tmpfs: deleting costs the next phase nothing
        report.note(format!(
            "control, same capacity run with the results dir on tmpfs (/dev/shm): {:.0} jobs/s, assign p99 {:.2} ms, peak RSS {} kB",
            control.jobs_per_s, control.assign_p99_ms, control.peak_rss_kb
        ));
        for n in control.notes {
            report.note(format!("control (tmpfs): {n}"));
        }
    }
    Ok(())
}

/// The real dispatcher (results under `dir`) with simulated runners and observer.
pub(crate) fn capacity_run(bins: &Bins, counts: Counts, dir: &Path) -> Result<Capacity> {
    let (dispatcher, addr) = lone_dispatcher(bins, dir, "1s", "3s")?;
    let pid = dispatcher.pid();
    let rt = runtime()?;
    let n = counts.capacity_commits;
    let out = rt.block_on(async {
        let shared = Arc::new(SimShared {
            registered: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        let tasks = start_sims(&addr, counts.sim_runners, &shared).await?;
        let mut obs = connect(&addr, Role::Observer).await?;
        let commits: Vec<CommitId> = (0..n).map(fake_commit).collect();
        let mut batches: Vec<(Instant, Instant)> = Vec::new();
        let threads_before = thread_cpu(pid);
        let own_before = cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0.0);
        let first_sent = Instant::now();
        for chunk in commits.chunks(counts.submit_batch) {
            let sent = Instant::now();
            obs.send(&ToDispatcher::Submit {
                commits: chunk.to_vec(),
                branch: None,
                front: false,
                rerun: false,
            })
            .await?;
            match obs
                .recv_within::<FromDispatcher>(Duration::from_secs(60), "Submitted")
                .await?
            {
                FromDispatcher::Submitted { queued, .. } if queued as usize == chunk.len() => {}
                other => bail!("unexpected answer to Submit: {other:?}"),
            }
            batches.push((sent, Instant::now()));
        }
        let all_acked = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut last_progress = Instant::now();
        while shared.acked.load(Ordering::SeqCst) < n {
            if Instant::now() >= deadline {
                bail!(
                    "only {} of {n} results after 600 s",
                    shared.acked.load(Ordering::SeqCst)
                );
            }
            if tasks.iter().any(|t| t.is_finished()) {
                bail!("a simulated runner stopped during the run");
            }
            if last_progress.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "  … {} of {n} jobs done",
                    shared.acked.load(Ordering::SeqCst)
                );
                last_progress = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let hwm = proc_status_kb(pid, "VmHWM")?;
        let wall = first_sent.elapsed().as_secs_f64();
        let own = cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0.0) - own_before;
        let threads = format!(
            "{}; the bench itself (simulated peers, log readers) {:.2} s ({:.0}% of wall)",
            thread_cpu_delta(&threads_before, &thread_cpu(pid), wall),
            own,
            own / wall * 100.0
        );
        shared.stop.cancel();
        let mut logs = Vec::new();
        for t in tasks {
            logs.push(t.await??);
        }
        Ok::<_, anyhow::Error>((first_sent, all_acked, batches, logs, hwm, threads))
    })?;
    let (first_sent, all_acked, batches, logs, hwm, threads) = out;

    let last_ack = logs
        .iter()
        .filter_map(|l| l.last_ack)
        .max()
        .ok_or_else(|| anyhow!("no results at all"))?;
    let last_assign = logs
        .iter()
        .flat_map(|l| l.assigns.iter().map(|a| a.1))
        .max()
        .ok_or_else(|| anyhow!("no assignments at all"))?;
    let total = (last_ack - first_sent).as_secs_f64();
    let mut ready_lat = Vec::with_capacity(n);
    let mut queue_lat = Vec::with_capacity(n);
    let mut per_runner = Vec::new();
    for l in &logs {
        per_runner.push(l.assigns.len() as f64);
        for &(idx, at, free_since) in &l.assigns {
            let Some(&(_, acked)) = batches.get(idx / counts.submit_batch) else {
                bail!("assignment of unknown commit #{idx}");
            };
            let ready = free_since.map_or(acked, |f| f.max(acked));
            ready_lat.push(at.saturating_duration_since(ready).as_secs_f64() * 1000.0);
            queue_lat.push(at.saturating_duration_since(acked).as_secs_f64() * 1000.0);
        }
    }
    if ready_lat.len() != n {
        bail!("{} assignments for {n} commits", ready_lat.len());
    }
    let count_files = || -> Result<usize> {
        Ok(std::fs::read_dir(dir.join("test_results"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count())
    };
    let files = count_files()?;
    // A ResultAck means the result is durable (in the dispatcher's database); its
    // <sha>.json is written right after by the dispatcher's result-writer thread. Wait
    // for every file too, and report that rate beside the key.
    let files_deadline = Instant::now() + Duration::from_secs(300);
    while count_files()? < n {
        if Instant::now() > files_deadline {
            let problems: Vec<String> = dispatcher
                .log()
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                .take(5)
                .map(str::to_owned)
                .collect();
            bail!(
                "only {} of {n} result files after 300 s; dispatcher said: {problems:?}",
                count_files()?
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let files_total = first_sent.elapsed().as_secs_f64();
    drop(dispatcher);
    let state = dir.join("test_results").join(".tinyci");
    let size = |name: &str| std::fs::metadata(state.join(name)).map_or(0, |m| m.len());
    let (db_bytes, wal_bytes) = (size("tinyci.db"), size("tinyci.db-wal"));
    let ack_ms: Vec<f64> = batches
        .iter()
        .map(|(s, a)| (*a - *s).as_secs_f64() * 1000.0)
        .collect();
    let notes = vec![
        format!(
            "capacity: {n} commits, {} simulated runners, Submit batches of {}: all submitted+acked in {:.2} s, last Assign at {:.2} s, last ResultAck at {:.2} s; {files} result files on disk",
            counts.sim_runners,
            counts.submit_batch,
            (all_acked - first_sent).as_secs_f64(),
            (last_assign - first_sent).as_secs_f64(),
            total
        ),
        format!(
            "assignable→Assign latency ms (the key): {}; p99={:.2}",
            summary(&ready_lat),
            pct(&ready_lat, 99.0)
        ),
        format!(
            "batch-ack→Assign latency ms (includes waiting in the queue behind earlier commits): {}; p99={:.2}",
            summary(&queue_lat),
            pct(&queue_lat, 99.0)
        ),
        format!("Submit→Submitted ms per batch: {}", summary(&ack_ms)),
        format!(
            "every <sha>.json on disk at {files_total:.2} s: {:.0} jobs/s counting until the last result file exists (the key counts until the last ResultAck, when each result is durable in the database)",
            n as f64 / files_total
        ),
        format!("jobs per simulated runner: {}", summary(&per_runner)),
        format!(
            "database after the run: tinyci.db {:.1} MiB + WAL {:.1} MiB ({:.0} bytes per run, no steps)",
            db_bytes as f64 / 1048576.0,
            wal_bytes as f64 / 1048576.0,
            (db_bytes + wal_bytes) as f64 / n as f64
        ),
        format!("dispatcher CPU by thread during the run: {threads}"),
    ];
    Ok(Capacity {
        jobs_per_s: n as f64 / total,
        assign_p99_ms: pct(&ready_lat, 99.0),
        peak_rss_kb: hwm,
        notes,
    })
}
