//! tinyci: a small distributed continuous-integration system.
//!
//! Three roles, one module each — [`observer`] reports new commits, [`dispatcher`] queues
//! them and hands them to runners, [`runner`] checks them out and runs their steps — plus the
//! pieces they share: [`git`] (every git2 call), [`spec`] (`.tinyci.toml`), [`results`] (the
//! files under `test_results/`), [`net`] (connecting, binding, backoff) and [`shutdown`]. [`client`] is the `tinyci` command and its git hooks;
//! [`http`] the dispatcher's HTTP API and pages.
//! The wire format lives in the `tinyci-proto` crate.

pub mod client;
pub mod dispatcher;
pub mod exit;
pub mod git;
pub mod http;
pub mod lock;
pub mod logging;
pub mod net;
pub mod observer;
pub mod results;
pub mod runner;
pub mod shutdown;
pub mod spec;

pub use tinyci_proto as proto;
