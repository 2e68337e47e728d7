//! `test_runner`: runs the steps of commits the dispatcher assigns, in its own clone.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tinyci::{git, net, runner, shutdown::Shutdown};

/// Registers with the dispatcher and runs one job at a time in REPO_CLONE.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on (and to register as).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Exact port to listen on (overrides --port-range).
    #[arg(long, conflicts_with = "port_range")]
    port: Option<u16>,
    /// Take the first free port in this range.
    #[arg(long, default_value = "8900-9000", value_parser = net::parse_port_range)]
    port_range: std::ops::RangeInclusive<u16>,
    /// The dispatcher's host:port.
    #[arg(long, default_value = "localhost:8888", value_parser = net::parse_peer_addr)]
    dispatcher_server: String,
    /// Most bytes of output kept per job; the rest is cut with a marker line.
    #[arg(long, default_value_t = runner::DEFAULT_OUTPUT_CAP)]
    output_limit: u64,
    /// On SIGTERM/Ctrl-C, how long to let the running job finish before its steps are
    /// killed and the commit handed back (a second signal does that at once).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// File holding the shared secret (default: $TINYCI_TOKEN, if set).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Take a clone that has uncommitted changes or untracked files: the runner resets and
    /// cleans its clone before every job, so they are deleted.
    #[arg(long)]
    discard_changes: bool,
    /// A fetch whose origin has not answered within this is aborted.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    fetch_connect_timeout: Duration,
    /// A fetch that receives nothing for this long is aborted.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    fetch_stall_timeout: Duration,
    /// The runner's own clone of the master repository.
    repo_clone: PathBuf,
}

fn main() -> ExitCode {
    // A step's supervisor is this binary in a hidden mode; it must start before any thread.
    runner::supervisor::main_if_supervisor();
    runner::harden_process();
    tinyci::exit::main_with(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = net::load_token(args.token_file.as_deref())?;
    let ports = match args.port {
        Some(p) => p..=p,
        None => args.port_range,
    };
    let listener = net::bind_in_range(&args.host, ports)
        .await
        .context("cannot bind the runner's port")?;
    let config = runner::Config {
        repo: args.repo_clone,
        dispatcher: args.dispatcher_server,
        token,
        output_cap: args.output_limit,
        drain_timeout: args.drain_timeout,
        workspace: git::WorkspaceOptions {
            discard_changes: args.discard_changes,
            limits: git::FetchLimits {
                connect_timeout: args.fetch_connect_timeout,
                stall_timeout: args.fetch_stall_timeout,
            },
        },
    };
    runner::run(listener, config, Shutdown::on_signals_draining()).await?;
    Ok(())
}
