//! `repo_observer`: reports every new commit of a branch to the dispatcher.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tinyci::{git, net, observer, shutdown::Shutdown};

/// Polls REPO_CLONE's origin and submits each new commit to the dispatcher, oldest first.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The dispatcher's host:port.
    #[arg(long, default_value = "localhost:8888", value_parser = net::parse_peer_addr)]
    dispatcher_server: String,
    /// How often origin is polled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Branch to follow (default: origin's default branch).
    #[arg(long)]
    branch: Option<String>,
    /// Where the last acknowledged commit is kept (default: REPO_CLONE/.git/tinyci-observer.state).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// File holding the shared secret (default: $TINYCI_TOKEN, if set).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A fetch whose origin has not answered within this is aborted.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    fetch_connect_timeout: Duration,
    /// A fetch that receives nothing for this long is aborted.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    fetch_stall_timeout: Duration,
    /// The observer's own clone of the master repository.
    repo_clone: PathBuf,
}

fn main() -> ExitCode {
    tinyci::exit::main_with(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.poll_interval.is_zero() {
        anyhow::bail!("--poll-interval must be positive");
    }
    let token = net::load_token(args.token_file.as_deref())?;
    let config = observer::Config {
        repo: args.repo_clone,
        dispatcher: args.dispatcher_server,
        poll_interval: args.poll_interval,
        branch: args.branch,
        token,
        state_file: args.state_file,
        limits: git::FetchLimits {
            connect_timeout: args.fetch_connect_timeout,
            stall_timeout: args.fetch_stall_timeout,
        },
    };
    observer::run(config, Shutdown::on_signals()).await?;
    Ok(())
}
