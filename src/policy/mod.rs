//! The policy language: text → syntax tree → validated, compiled [`Policy`] → decisions.
//!
//! One module per arrow (cedar's split): [`syntax`] parses (the only user of pest),
//! [`compile`] validates and lowers into [`model`], [`routes`] matches paths, [`decide`] turns
//! a request into an outcome, [`fmt`] prints the canonical form, [`cases`] runs the operator's
//! `test` blocks, [`diag`] renders what went wrong. This facade composes them.
//!
//! **Invariant:** nothing here does network I/O, reads a clock or touches the store; reading
//! policy files from disk happens only in [`load`] and [`discover`].

pub mod ast;
pub mod cases;
pub mod compile;
pub mod decide;
pub mod diag;
pub mod fmt;
pub mod model;
pub mod routes;
pub mod source;
mod syntax;

use std::path::{Path, PathBuf};

pub use decide::{Buyer, Decision, Outcome, PaymentHeader, Request, Why, decide};
pub use diag::{Diagnostic, Severity, Style};
pub use model::*;
pub use source::Source;
pub use syntax::{Parsed, parse};

/// Policy files end in `.toll`; side files of test cases end in `.test.toll`.
pub const EXTENSION: &str = "toll";
pub const TEST_SUFFIX: &str = ".test.toll";

/// Everything checking one policy file found.
#[derive(Debug)]
pub struct Checked {
    pub source: Source,
    pub file: Option<ast::PolicyFile>,
    pub policy: Option<Policy>,
    /// The file's `test` blocks.
    pub cases: Vec<cases::Case>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn warnings(&self) -> usize {
        self.diagnostics.len() - self.errors()
    }

    /// All diagnostics, rendered in source order.
    pub fn render(&self, style: Style) -> String {
        diag::render_all(&self.diagnostics, &self.source, style)
    }
}

/// Parses, validates and compiles one policy file's text.
///
/// ```
/// use tollgate::policy::{self, Buyer, Request, Source};
///
/// let text = r#"
/// service "weather" {
///   pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C
///   accept x402 on base-sepolia
///   settle via facilitator "https://x402.org/facilitator"
///   default deny
///   route GET "/v1/forecast/{city}" { price 0.001 USDC }
/// }
/// "#;
/// let checked = policy::check(Source::new("weather.toll", text));
/// assert_eq!(checked.errors(), 0, "{}", checked.render(policy::Style::Plain));
/// let policy = checked.policy.expect("compiles");
///
/// let request = Request { method: "GET", target: "/v1/forecast/paris", api_key: false, payment: None };
/// let decision = policy::decide(&policy, &request, &Buyer::default());
/// assert_eq!(decision.outcome.name(), "challenge"); // 402 with the x402 offer
/// assert_eq!(decision.route.and_then(|r| r.price()).map(|p| p.offers[0].amount), Some(1_000));
/// ```
pub fn check(source: Source) -> Checked {
    let parsed = syntax::parse(&source.text);
    let mut diagnostics = parsed.diagnostics;
    let partial = !diagnostics.is_empty();
    let mut policy = None;
    let mut found = Vec::new();
    if let Some(file) = &parsed.file {
        let (compiled, more) = compile::compile(file, &source, partial);
        diagnostics.extend(more);
        let (collected, case_diagnostics) = cases::collect(file, &source);
        diagnostics.extend(case_diagnostics);
        found = collected;
        if !diagnostics.iter().any(Diagnostic::is_error) {
            policy = compiled;
        }
    }
    Checked {
        source,
        file: parsed.file,
        policy,
        cases: found,
        diagnostics,
    }
}

/// Parses a `*.test.toll` side file: test blocks only.
pub fn check_tests(source: Source) -> Checked {
    let parsed = syntax::parse(&source.text);
    let mut diagnostics = parsed.diagnostics;
    let mut found = Vec::new();
    if let Some(file) = &parsed.file {
        for item in &file.items {
            if !matches!(item.node, ast::Item::Test(_)) {
                let end = source
                    .text
                    .get(item.span.start..)
                    .and_then(|s| s.find('\n'))
                    .map_or(item.span.end, |n| item.span.start + n);
                diagnostics.push(
                    Diagnostic::error(
                        "not_a_test",
                        Span::new(item.span.start, end),
                        "a `.test.toll` file holds only `test` blocks",
                    )
                    .help("move this block into the policy file"),
                );
            }
        }
        let (cases, more) = cases::collect(file, &source);
        diagnostics.extend(more);
        found = cases;
    }
    Checked {
        source,
        file: parsed.file,
        policy: None,
        cases: found,
        diagnostics,
    }
}

use source::Span;

/// Why a policy could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    Invalid(Box<Checked>),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Read { path, error } => {
                write!(f, "cannot read policy {}: {error}", path.display())
            }
            LoadError::Invalid(checked) => {
                write!(f, "{}", checked.render(Style::Plain))?;
                write!(
                    f,
                    "policy {} has {} error(s)",
                    checked.source.name,
                    checked.errors()
                )
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// The largest policy file tollgate reads; real ones are a few kilobytes.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// Reads the text of a file as a [`Source`] named by its path.
pub fn read(path: &Path) -> Result<Source, LoadError> {
    let error = |error| LoadError::Read {
        path: path.to_path_buf(),
        error,
    };
    let size = std::fs::metadata(path).map_err(error)?.len();
    if size > MAX_POLICY_BYTES {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file is {size} bytes; a policy file may hold at most 1 MiB"),
        )));
    }
    std::fs::read_to_string(path)
        .map(|text| Source::new(path.display().to_string(), text))
        .map_err(error)
}

/// Reads and compiles one policy file.
pub fn load(path: &Path) -> Result<Policy, LoadError> {
    let mut checked = check(read(path)?);
    match checked.policy.take() {
        Some(policy) => Ok(policy),
        None => Err(LoadError::Invalid(Box::new(checked))),
    }
}

/// Whether a path names a side file of test cases.
pub fn is_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(TEST_SUFFIX))
}

/// The side file of test cases that belongs to a policy file, if it exists.
pub fn test_file_for(policy: &Path) -> Option<PathBuf> {
    let stem = policy.file_name()?.to_str()?.strip_suffix(".toll")?;
    let side = policy.with_file_name(format!("{stem}{TEST_SUFFIX}"));
    side.is_file().then_some(side)
}

/// Expands files and folders into `.toll` files (folders: sorted, not recursive).
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|error| LoadError::Read {
                path: path.clone(),
                error,
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == EXTENSION))
                .collect();
            found.sort();
            out.extend(found);
        } else if path.exists() {
            out.push(path.clone());
        } else {
            return Err(LoadError::Read {
                path: path.clone(),
                error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            });
        }
    }
    Ok(out)
}
