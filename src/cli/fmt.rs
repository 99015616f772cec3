//! `tollgate fmt`: rewrite policy files in canonical form, or check that they are.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Failed, policy_paths, style};
use crate::policy::{self, diag, fmt::format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy files or folders of them [default: the config's `policies`, i.e. `policies/`]
    paths: Vec<PathBuf>,
    /// Change nothing; list the files that are not in canonical form and exit 1 if any
    #[arg(long)]
    check: bool,
    /// Print the canonical form on stdout instead of rewriting the files
    #[arg(long, conflicts_with = "check")]
    stdout: bool,
}

pub fn run(args: Args) -> Result<ExitCode, Failed> {
    let paths = policy_paths(args.paths, None)?;
    let files = policy::discover(&paths).map_err(|e| e.to_string())?;
    let mut unformatted = 0;
    let mut broken = 0;
    for path in &files {
        let source = policy::read(path).map_err(|e| e.to_string())?;
        let parsed = policy::parse(&source.text);
        let file = match parsed.file {
            Some(file) if parsed.diagnostics.is_empty() => file,
            _ => {
                eprint!(
                    "{}",
                    diag::render_all(&parsed.diagnostics, &source, style())
                );
                eprintln!("skipped {}: fix the syntax errors first", path.display());
                broken += 1;
                continue;
            }
        };
        let formatted = format(&file, &source.text);
        if args.stdout {
            print!("{formatted}");
            continue;
        }
        if formatted == *source.text {
            continue;
        }
        unformatted += 1;
        if args.check {
            println!("would reformat {}", path.display());
        } else {
            std::fs::write(path, &formatted)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("formatted {}", path.display());
        }
    }
    let failed = broken > 0 || (args.check && unformatted > 0);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
