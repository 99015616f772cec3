//! `tollgate check`: validate policy files (and test side files) and the sidecar config.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Failed, config_path, policy_paths, style};
use crate::config::Config;
use crate::policy::{self, Checked};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy files or folders of them [default: the config's `policies`, i.e. `policies/`]
    paths: Vec<PathBuf>,
    /// Also validate this sidecar config file (YAML) and the TOLLGATE_* environment
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode, Failed> {
    let mut errors = 0;
    let mut warnings = 0;
    if args.config.is_some() {
        let path = config_path(args.config.as_ref());
        match Config::load(path.as_deref()) {
            Ok(resolved) => {
                for w in &resolved.warnings {
                    eprintln!("warning: {w}");
                }
                warnings += resolved.warnings.len();
                let name = path.map_or_else(
                    || "built-in defaults".to_string(),
                    |p| p.display().to_string(),
                );
                println!("ok    config {name}");
            }
            Err(e) => {
                eprintln!("{e}");
                errors += e.0.len();
            }
        }
    }
    let paths = policy_paths(args.paths, args.config.as_ref())?;
    let files = policy::discover(&paths).map_err(|e| e.to_string())?;
    if files.is_empty() {
        return Err(format!(
            "no policy files (*.toll) in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for path in &files {
        let source = policy::read(path).map_err(|e| e.to_string())?;
        let checked: Checked = if policy::is_test_file(path) {
            policy::check_tests(source).1
        } else {
            policy::check(source)
        };
        eprint!("{}", checked.render(style()));
        errors += checked.errors();
        warnings += checked.warnings();
        match (&checked.policy, checked.errors()) {
            (Some(p), 0) => println!(
                "ok    {} (service {:?}, {} route{}, version {})",
                path.display(),
                p.service,
                p.routes.len(),
                if p.routes.len() == 1 { "" } else { "s" },
                p.version
            ),
            (None, 0) => println!("ok    {}", path.display()),
            (_, n) => println!(
                "FAIL  {} ({n} error{})",
                path.display(),
                if n == 1 { "" } else { "s" }
            ),
        }
    }
    println!(
        "{} file{} checked: {errors} error{}, {warnings} warning{}",
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        if errors == 1 { "" } else { "s" },
        if warnings == 1 { "" } else { "s" }
    );
    Ok(if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
