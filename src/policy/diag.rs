//! Diagnostics: every mistake `tollgate check` can report about a policy file.
//!
//! A [`Diagnostic`] is plain data (stable code, message, primary span and label, help, related
//! spans). [`render`] prints it as rustc does: `error[code]: message`, then `file:line:col`, the
//! source line with a caret under the span, and the hint. Messages follow cedar's rules: lower
//! case, user input in backticks, no final period, detail in `help` rather than in the message.

use super::source::{Source, Span};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable machine-readable code, e.g. `unknown_network`.
    pub code: &'static str,
    pub message: String,
    pub span: Span,
    pub label: Option<String>,
    pub help: Option<String>,
    /// Other places that explain this one, e.g. "first defined here".
    pub related: Vec<(Span, String)>,
}

impl Diagnostic {
    pub fn error(code: &'static str, span: Span, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, span, message)
    }

    pub fn warning(code: &'static str, span: Span, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, span, message)
    }

    fn new(severity: Severity, code: &'static str, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity,
            code,
            message: message.into(),
            span,
            label: None,
            help: None,
            related: Vec::new(),
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn related(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related.push((span, label.into()));
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// How to draw diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// No colour: logs, CI, golden tests.
    Plain,
    /// ANSI colour: a terminal.
    Fancy,
}

struct Paint {
    on: bool,
}

impl Paint {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// Renders one diagnostic against its source, in the layout rustc made familiar:
///
/// ```text
/// error[unknown_network]: unknown network `base-sepolai`
///   --> policies/weather.toll:3:18
///    |
///  3 |   accept x402 on base-sepolai
///    |                  ^^^^^^^^^^^^ not a known network
///    |
///    = help: did you mean `base-sepolia`?
/// ```
pub fn render(diagnostic: &Diagnostic, source: &Source, style: Style) -> String {
    let paint = Paint {
        on: style == Style::Fancy,
    };
    let (word, colour) = match diagnostic.severity {
        Severity::Error => ("error", "1;31"),
        Severity::Warning => ("warning", "1;33"),
    };
    let mut out = format!(
        "{}: {}\n",
        paint.paint(colour, &format!("{word}[{}]", diagnostic.code)),
        paint.paint("1", &diagnostic.message)
    );
    // The primary span first, then related ones, each drawn on its own source line.
    let mut marks: Vec<(Span, Option<&str>, bool)> =
        vec![(diagnostic.span, diagnostic.label.as_deref(), true)];
    marks.extend(
        diagnostic
            .related
            .iter()
            .map(|(span, label)| (*span, Some(label.as_str()), false)),
    );
    let lines: Vec<&str> = source.text.split('\n').collect();
    let width = marks
        .iter()
        .map(|(s, _, _)| source.line_col(s.start).0.to_string().len())
        .max()
        .unwrap_or(1);
    let gutter = |n: &str| paint.paint("1;34", &format!("{n:>width$} |"));
    let (line, col) = source.line_col(diagnostic.span.start);
    out.push_str(&format!(
        "{}{} {}:{line}:{col}\n",
        " ".repeat(width),
        paint.paint("1;34", "-->"),
        source.name
    ));
    out.push_str(&format!("{}\n", gutter("")));
    let mut sorted = marks.clone();
    sorted.sort_by_key(|(s, _, primary)| (s.start, !primary));
    let mut last_line = None;
    for (span, label, primary) in sorted {
        let (line, col) = source.line_col(span.start);
        if last_line.is_some_and(|last| line > last + 1) {
            out.push_str(&format!("{}\n", paint.paint("1;34", "...")));
        }
        let text = lines
            .get(line - 1)
            .copied()
            .unwrap_or("")
            .trim_end_matches('\r')
            .replace('\t', " ");
        if last_line != Some(line) {
            out.push_str(&format!("{} {text}\n", gutter(&line.to_string())));
        }
        last_line = Some(line);
        let on_line = text.chars().count().saturating_sub(col - 1);
        let len = source
            .slice(span)
            .split('\n')
            .next()
            .map_or(0, |s| s.chars().count())
            .min(on_line.max(1))
            .max(1);
        let (mark, colour) = if primary {
            (
                "^",
                if diagnostic.is_error() {
                    "1;31"
                } else {
                    "1;33"
                },
            )
        } else {
            ("-", "1;34")
        };
        let underline = paint.paint(
            colour,
            &format!(
                "{}{}",
                mark.repeat(len),
                label.map_or(String::new(), |l| format!(" {l}"))
            ),
        );
        out.push_str(&format!(
            "{} {}{underline}\n",
            gutter(""),
            " ".repeat(col - 1)
        ));
    }
    if let Some(help) = &diagnostic.help {
        out.push_str(&format!("{}\n", gutter("")));
        out.push_str(&format!(
            "{} = {}: {help}\n",
            " ".repeat(width),
            paint.paint("1", "help")
        ));
    }
    out
}

/// Renders many diagnostics in source order, separated by blank lines.
pub fn render_all(diagnostics: &[Diagnostic], source: &Source, style: Style) -> String {
    let mut sorted: Vec<&Diagnostic> = diagnostics.iter().collect();
    sorted.sort_by_key(|d| (d.span.start, d.span.end));
    sorted
        .iter()
        .map(|d| render(d, source, style) + "\n")
        .collect()
}
