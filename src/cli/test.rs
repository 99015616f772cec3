//! `tollgate test`: run the policy test cases (`test` blocks in policy files and side files).

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Failed, policy_paths, style};
use crate::policy::{self, cases::Case};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy files or folders of them [default: the config's `policies`, i.e. `policies/`]
    paths: Vec<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode, Failed> {
    let paths = policy_paths(args.paths, None)?;
    let files = policy::discover(&paths).map_err(|e| e.to_string())?;
    let (mut passed, mut failed, mut broken) = (0usize, 0usize, 0usize);
    for path in files.iter().filter(|p| !policy::is_test_file(p)) {
        let checked = policy::check(policy::read(path).map_err(|e| e.to_string())?);
        eprint!("{}", checked.render(style()));
        let Some(compiled) = &checked.policy else {
            println!("FAIL  {}: the policy does not validate", path.display());
            broken += 1;
            continue;
        };
        let mut cases: Vec<Case> = checked.cases;
        if let Some(side) = policy::test_file_for(path) {
            let side_checked = policy::check_tests(policy::read(&side).map_err(|e| e.to_string())?);
            eprint!("{}", side_checked.render(style()));
            if side_checked.errors() > 0 {
                println!("FAIL  {}: the test file does not validate", side.display());
                broken += 1;
                continue;
            }
            cases.extend(side_checked.cases);
        }
        if cases.is_empty() {
            continue;
        }
        println!("{}", path.display());
        for case in &cases {
            match case.run(compiled) {
                Ok(()) => {
                    passed += 1;
                    println!("  ok    {}", case.name);
                }
                Err(failure) => {
                    failed += 1;
                    println!("  FAIL  {} ({})", case.name, case.origin);
                    let headers: Vec<&str> = case.headers.iter().map(|(n, _)| n.as_str()).collect();
                    let with = if headers.is_empty() {
                        String::new()
                    } else {
                        format!("  with {}", headers.join(", "))
                    };
                    println!("        request   {} {}{with}", case.method, case.target);
                    println!("        expected  {}", failure.expected);
                    println!("        actual    {}", failure.actual);
                    println!("        because   {}", failure.why);
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed + broken > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
