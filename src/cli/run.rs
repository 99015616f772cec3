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
    crate::server::run(&resolved.config)?;
    Ok(ExitCode::SUCCESS)
}
