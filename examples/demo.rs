//! The one-command demo: a master repository made from `test_repo_fixture/`, a dispatcher,
//! two runners and an observer, then a passing and a failing commit, and their results.
//!
//! Run with `cargo build --release && cargo run --release --example demo`
//! (add `-- --keep` to keep the directory and look around afterwards).

use anyhow::Result;
use testkit::*;

fn main() -> Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let bins = Bins::beside_current_exe()?;
    println!("starting a dispatcher, two test runners and a repo observer…");
    let mut c = Cluster::start(
        bins,
        Opts {
            runners: 2,
            poll_interval: "200ms",
            heartbeat_interval: "1s",
            heartbeat_timeout: "3s",
            ..Opts::default()
        },
    )?;
    println!("  master repo:  {}", c.master.dir.display());
    println!("  dispatcher:   {}", c.addr);
    println!("  runners:      {}", c.runner_addrs.join(", "));
    println!("  results dir:  {}", c.results.display());

    let tip = c.master.head()?;
    let good = c.commit(
        "add a doc string (passes)",
        &[("NOTES.md", "tinyci demo: this commit passes\n")],
    )?;
    let bad = c.commit(
        "break add() (fails)",
        &[(
            "calc.py",
            "def add(a, b):\n    return a - b\n\n\ndef mean(values):\n    return sum(values) / len(values)\n",
        )],
    )?;
    println!(
        "\ncommitted {} (passing) and {} (failing); waiting for results…\n",
        &good[..10],
        &bad[..10]
    );

    for (label, sha) in [("initial", &tip), ("passing", &good), ("failing", &bad)] {
        let r = c.wait_result(sha, WAIT)?;
        let steps: Vec<String> = steps(&r)
            .into_iter()
            .map(|(n, s)| format!("{n}={s}"))
            .collect();
        println!(
            "{label:8} {}  {:8} [{}] on {}",
            &sha[..10],
            r["status"].as_str().unwrap_or("?"),
            steps.join(", "),
            r["runner"].as_str().unwrap_or("?")
        );
    }
    println!("\n--- {}.json", bad);
    println!("{}", std::fs::read_to_string(c.json_path(&bad))?.trim_end());
    println!("--- {}.log", bad);
    print!("{}", c.log_text(&bad));

    if keep {
        let dir = std::mem::replace(&mut c.tmp, tempfile::tempdir()?).keep();
        println!("\nkept {} (processes stopped)", dir.display());
    }
    Ok(())
}
