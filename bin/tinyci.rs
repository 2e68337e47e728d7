//! `tinyci`: asks the dispatcher what it is doing, shows runs and their logs, submits and
//! cancels, and installs the git hooks that stream runs into `git push`.

use std::process::ExitCode;

fn main() -> ExitCode {
    tinyci::client::cli::main()
}
