//! `tollgate run`: start the sidecar with the configuration and its one policy.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Failed, config_path};
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sidecar config file (YAML) [default: $TOLLGATE_CONFIG, else ./tollgate.yaml when it
    /// exists, else built-in defaults: listen 0.0.0.0:8402, upstream http://127.0.0.1:8080,
    /// policies from ./policies, store in ./tollgate-data]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode, Failed> {
    let resolved = Config::load(config_path(args.config.as_ref()).as_deref())
        .map_err(|e| format!("invalid configuration:\n{e}"))?;
    for warning in &resolved.warnings {
        eprintln!("warning: {warning}");
    }
    match crate::server::run(&resolved.config)? {
        crate::server::Stopped::Signal => Ok(ExitCode::SUCCESS),
        crate::server::Stopped::Restart => Err(restart_in_place()),
    }
}

/// Replaces this process with a fresh `tollgate run` of the same binary and arguments (same
/// PID, so a supervisor or Kubernetes sees no exit). Every descriptor tollgate opened is
/// close-on-exec: the store's lock and the listening sockets are released. Returns only when
/// that fails.
fn restart_in_place() -> Failed {
    use std::os::unix::process::CommandExt as _;
    let binary = match std::env::current_exe() {
        Ok(binary) => binary,
        Err(e) => return format!("cannot restart to reopen the store: {e}"),
    };
    let e = std::process::Command::new(binary)
        .args(std::env::args_os().skip(1))
        .exec();
    format!("cannot restart to reopen the store: {e}")
}
