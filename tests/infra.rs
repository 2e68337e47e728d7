//! Infrastructure faults against the real binaries (issue 9): none of them ever becomes a
//! commit's verdict. Broken clones, an origin that goes away for a while, graceful stops of
//! the dispatcher and of a runner, a black-holed connection, a second dispatcher on the
//! same results directory.

mod support;

use std::process::Command;

use anyhow::{ensure, Result};
use support::*;

fn bins() -> Bins {
    Bins::for_tests()
}

#[test]
fn second_dispatcher_on_the_same_results_dir_is_refused_naming_the_holder() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let mut cmd = Command::new(&c.bins.dispatcher);
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--results-dir"])
        .arg(&c.results)
        .env_remove("TINYCI_TOKEN");
    let mut second = Proc::spawn("second dispatcher", cmd)?;
    let status = second
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow::anyhow!("the second dispatcher kept running"))?;
    ensure!(!status.success(), "second dispatcher exited with {status}");
    let first_pid = c.dispatcher().pid();
    second.wait_for(
        &["in use by another dispatcher", &format!("pid {first_pid}")],
        WAIT,
    )?;
    ensure!(
        second.count(&["listening"]) == 0,
        "the second dispatcher must not serve: {}",
        second.log()
    );
    // The first one goes on.
    let sha = c.commit("after the refusal", &[("f.txt", "1")])?;
    assert_eq!(c.wait_result(&sha, WAIT)?["status"], "success");
    Ok(())
}
