//! The idle CPU of the real dispatcher with simulated runners.

use super::*;

pub(crate) fn idle_cpu(
    bins: &Bins,
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
    let (dispatcher, addr) = lone_dispatcher(bins, tmp.path(), "1s", "3s")?;
    let pid = dispatcher.pid();
    let rt = runtime()?;
    let (pct_cpu, pct_ticks, rss) = rt.block_on(async {
        let shared = Arc::new(SimShared {
            registered: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        let tasks = start_sims(&addr, counts.sim_runners, &shared).await?;
        // Let the registration burst pass.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (c0, k0, t0) = (cpu_seconds(pid)?, cpu_seconds_ticks(pid)?, Instant::now());
        tokio::time::sleep(counts.idle_cpu_window).await;
        let (c1, k1, t1) = (cpu_seconds(pid)?, cpu_seconds_ticks(pid)?, Instant::now());
        let wall = (t1 - t0).as_secs_f64();
        let rss = proc_status_kb(pid, "VmRSS")?;
        if tasks.iter().any(|t| t.is_finished()) {
            bail!("a simulated runner stopped during the idle window");
        }
        shared.stop.cancel();
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(((c1 - c0) / wall * 100.0, (k1 - k0) / wall * 100.0, rss))
    })?;
    report.ms(
        "idle_cpu_pct_100_runners",
        pct_cpu,
        Some(Target::AtMost(2.0)),
    );
    report.note(format!(
        "idle CPU window {:?} with {} simulated runners: {pct_cpu:.3}% from the process CPU clock (ns), {pct_ticks:.2}% from utime+stime (clock ticks); dispatcher VmRSS then {rss} kB",
        counts.idle_cpu_window, counts.sim_runners
    ));
    drop(dispatcher);
    scratch.push(tmp);
    Ok(())
}
