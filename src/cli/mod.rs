//! The `tollgate` command line: argument parsing and one module per subcommand.
//!
//! Subcommands print results on stdout and diagnostics on stderr, and exit 0 when all is well,
//! 1 when a check or a test failed, 2 when the command itself could not run (bad arguments,
//! unreadable files).

mod admin;
mod check;
mod explain;
mod fmt;
mod ledger;
mod run;
mod test;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{CONFIG_ENV, Config};
use crate::policy::Style;

/// tollgate — a payment sidecar that lets any HTTP API charge AI agents and people per call.
///
/// Each service gets a policy file (`policies/<service>.toll`) saying which routes are free,
/// denied, paid per request with x402 (USDC authorizations signed by the buyer), or paid from
/// prepaid credits bound to an API key.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar: proxy to the upstream, charging as the policy says.
    Run(run::Args),
    /// Validate policy files and the sidecar config; print every problem with its location.
    Check(check::Args),
    /// Rewrite policy files in canonical form (or check that they are).
    Fmt(fmt::Args),
    /// Show what one request would get from a policy, and why.
    Explain(explain::Args),
    /// Run the test cases written in policy files (`test "…" { … }`).
    Test(test::Args),
    /// Prepaid accounts: create, list, show.
    Accounts(admin::AccountsArgs),
    /// API keys: issue, list, revoke.
    Keys(admin::KeysArgs),
    /// Credits: top up, balance, usage, audit.
    Credits(admin::CreditsArgs),
    /// The payment ledger: list, show, bundles, export for reconciliation, verify.
    Ledger(ledger::LedgerArgs),
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::run(args),
        Command::Fmt(args) => fmt::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Test(args) => test::run(args),
        Command::Accounts(args) => admin::accounts(args),
        Command::Keys(args) => admin::keys(args),
        Command::Credits(args) => admin::credits(args),
        Command::Ledger(args) => ledger::ledger(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// What a failed command says before exiting with status 2.
type Failed = String;

/// How diagnostics are drawn on stderr: colour and box drawing only on a terminal.
fn style() -> Style {
    if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        Style::Fancy
    } else {
        Style::Plain
    }
}

/// The policy paths to work on: those given, else the config's (`policies/` by default).
fn policy_paths(given: Vec<PathBuf>, config: Option<&PathBuf>) -> Result<Vec<PathBuf>, Failed> {
    if !given.is_empty() {
        return Ok(given);
    }
    let resolved = Config::load(config_path(config).as_deref())
        .map_err(|e| format!("invalid configuration:\n{e}"))?;
    Ok(resolved.config.policies)
}

/// `--config`, else `$TOLLGATE_CONFIG`, else `./tollgate.yaml` when it exists.
fn config_path(given: Option<&PathBuf>) -> Option<PathBuf> {
    given
        .cloned()
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
        .or_else(|| Some(PathBuf::from("tollgate.yaml")).filter(|p| p.is_file()))
}
