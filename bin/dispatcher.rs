//! `dispatcher`: queues commits from observers and hands them to test runners.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tinyci::{dispatcher, net, shutdown::Shutdown};

/// Queues commits reported by repo_observer and dispatches them to test_runners.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, default_value_t = 8888)]
    port: u16,
    /// Where <sha>.json and <sha>.log are written.
    #[arg(long, default_value = "test_results")]
    results_dir: PathBuf,
    /// How often each runner is pinged.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// A runner silent this long is removed and its commit requeued.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Attempts before a commit that keeps killing its runner is recorded as error.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// File holding the shared secret (default: $TINYCI_TOKEN, if set).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Also serve the HTTP API and pages on HOST:PORT (port 0 picks a free one; the log
    /// says which). Off unless given.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// At most this many HTTP connections at once.
    #[arg(long, default_value_t = tinyci::http::MAX_CONNECTIONS, value_parser = clap::value_parser!(usize))]
    http_max_connections: usize,
    /// An HTTP connection that moves no byte for this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    http_idle_timeout: Duration,
}

fn main() -> ExitCode {
    tinyci::exit::main_with(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.heartbeat_timeout <= args.heartbeat_interval {
        anyhow::bail!("--heartbeat-timeout must be longer than --heartbeat-interval");
    }
    let token = net::load_token(args.token_file.as_deref())?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let http = match &args.http {
        Some(addr) => Some(dispatcher::Http {
            listener: tokio::net::TcpListener::bind(addr.as_str())
                .await
                .with_context(|| format!("cannot listen for http on {addr}"))?,
            config: tinyci::http::Config {
                max_connections: args.http_max_connections.max(1),
                idle_timeout: args.http_idle_timeout,
            },
        }),
        None => None,
    };
    let config = dispatcher::Config {
        results_dir: args.results_dir,
        heartbeat_interval: args.heartbeat_interval,
        heartbeat_timeout: args.heartbeat_timeout,
        max_attempts: args.max_attempts,
        token,
    };
    dispatcher::run(listener, config, http, Shutdown::on_signals()).await?;
    Ok(())
}
