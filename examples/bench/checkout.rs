//! Phase 0: the runner's checkout alone, in process (`Workspace::prepare`).

use super::*;

pub(crate) fn checkout(
    counts: Counts,
    report: &mut Report,
    scratch: &mut Vec<tempfile::TempDir>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    for (label, files) in [("small", 0), ("large", counts.large_files)] {
        let tmp = tempfile::Builder::new().prefix("tinyci-bench-").tempdir()?;
        let master = Master::from_fixture(&tmp.path().join("master"))?;
        let file_name =
            |n: usize| format!("src/m{:02}/s{}/f{:02}.txt", n / 100, (n / 10) % 10, n % 10);
        if files > 0 {
            let all: Vec<(String, String)> = (0..files)
                .map(|n| (file_name(n), format!("file {n}\nversion 0\n")))
                .collect();
            commit_files(&master.dir, "bench: generated files", &all)?;
        }
        git(tmp.path(), &["clone", "-q", "master", "runner"])?;
        let runner = tmp.path().join("runner");
        let mut ws = tinyci::git::Workspace::open(&runner, Default::default())?;
        let mut ms = Vec::new();
        let mut phases: Vec<(&str, Vec<f64>)> = Vec::new();
        for i in 0..counts.checkout_commits + 2 {
            let body = format!("changed by commit {i}\n");
            let (sha, _) = commit_files(
                &master.dir,
                "bench: one file",
                &[(file_name(i % 1000), body)],
            )?;
            let sha = tinyci::proto::CommitId::parse(&sha)?;
            // What a step leaves: an untracked file and a cache directory.
            std::fs::write(runner.join("junk.txt"), "x")?;
            std::fs::create_dir_all(runner.join("__pycache__"))?;
            std::fs::write(runner.join("__pycache__/m.pyc"), "x")?;
            let t = Instant::now();
            let done = rt.block_on(ws.prepare(&sha, &cancel))?;
            if i >= 2 {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                for (phase, took) in done.phases {
                    match phases.iter_mut().find(|(p, _)| *p == phase) {
                        Some((_, v)) => v.push(took.as_secs_f64() * 1e3),
                        None => phases.push((phase, vec![took.as_secs_f64() * 1e3])),
                    }
                }
            }
        }
        let target = if files > 0 { 40.0 } else { 15.0 };
        let (p50, p99) = match label {
            "small" => ("checkout_small_p50_ms", "checkout_small_p99_ms"),
            _ => ("checkout_large_p50_ms", "checkout_large_p99_ms"),
        };
        report.ms(p50, pct(&ms, 50.0), Some(Target::AtMost(target)));
        report.ms(p99, pct(&ms, 99.0), None);
        report.note(format!("checkout {label} ms: {}", summary(&ms)));
        let by_phase: Vec<String> = phases
            .iter()
            .map(|(p, v)| format!("{p} {:.2}", pct(v, 50.0)))
            .collect();
        report.note(format!(
            "checkout {label} phases, p50 ms: {}",
            by_phase.join(", ")
        ));
        drop(ws);
        scratch.push(tmp);
    }
    Ok(())
}
