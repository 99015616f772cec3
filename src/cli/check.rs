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
    /// Also ask the settlement backends what startup asks them: the facilitator what it
    /// settles; for `settle via rpc`, the node's chain, each asset's EIP-3009 functions,
    /// Multicall3, and the relayer's gas
    #[arg(long)]
    online: bool,
}

pub fn run(args: Args) -> Result<ExitCode, Failed> {
    let mut errors = 0;
    let mut warnings = 0;
    let mut paths = args.paths;
    if args.config.is_some() {
        let path = config_path(args.config.as_ref());
        let name = path.as_ref().map_or_else(
            || "built-in defaults".to_string(),
            |p| p.display().to_string(),
        );
        match Config::load(path.as_deref()) {
            Ok(resolved) => {
                for w in &resolved.warnings {
                    eprintln!("warning: {w}");
                }
                warnings += resolved.warnings.len();
                println!("ok    config {name}");
                if paths.is_empty() {
                    paths = resolved.config.policies;
                }
            }
            Err(e) => {
                eprintln!("{e}");
                println!(
                    "FAIL  config {name} ({} error{})",
                    e.0.len(),
                    if e.0.len() == 1 { "" } else { "s" }
                );
                if paths.is_empty() {
                    // Without a valid config there is no list of policies to check.
                    return Ok(ExitCode::FAILURE);
                }
                errors += e.0.len();
            }
        }
    }
    let paths = policy_paths(paths, None)?;
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
            policy::check_tests(source)
        } else {
            policy::check(source)
        };
        eprint!("{}", checked.render(style()));
        errors += checked.errors();
        warnings += checked.warnings();
        match (&checked.policy, checked.errors()) {
            (Some(p), 0) => {
                println!(
                    "ok    {} (service {:?}, {} route{}, version {})",
                    path.display(),
                    p.service,
                    p.routes.len(),
                    if p.routes.len() == 1 { "" } else { "s" },
                    p.version
                );
                if args.online {
                    match online(p) {
                        Ok(said) => println!("ok    {} online: {said}", path.display()),
                        Err(why) => {
                            eprintln!("error: {why}");
                            println!("FAIL  {} online", path.display());
                            errors += 1;
                        }
                    }
                }
            }
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

/// What startup would learn from the policy's settlement backend.
fn online(policy: &crate::policy::Policy) -> Result<String, String> {
    let terms = crate::x402::Terms::new(policy);
    match &policy.settlement.backend {
        crate::policy::Backend::Facilitator { url } => {
            crate::settle::facilitator::check_supported(url, policy, &terms)?;
            Ok(format!(
                "the facilitator at {url} settles every network quoted (or could not be asked; see the warning)"
            ))
        }
        crate::policy::Backend::Rpc { url, .. } => {
            match crate::settle::onchain::check(policy, &terms)? {
                Some(c) => Ok(format!(
                    "node {} is chain {}; every asset answers EIP-3009; Multicall3 present; relayer {} holds {} wei of gas",
                    crate::settle::relayer::redact_url(url),
                    c.chain_id,
                    c.relayer,
                    c.gas_balance
                )),
                None => Ok("nothing to settle".into()),
            }
        }
        crate::policy::Backend::None => Ok("no settlement backend".into()),
    }
}
