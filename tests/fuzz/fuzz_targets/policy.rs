//! The policy language: any UTF-8 text through `policy::check` (parse, validate, compile, the
//! file's `test` blocks), the diagnostics rendered, and for a text that compiles its x402
//! terms and discovery document built and its `test` blocks run.
//!
//! For a text that parses without a syntax error, `tollgate fmt`'s contract
//! (`policy::fmt`): the canonical form parses without error to the same syntax tree, is its own
//! canonical form, and checks the same (compiles or not, with the same diagnostic codes).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::policy::{self, Source, Style, fmt};
use tollgate::x402::Terms;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let checked = policy::check(Source::new("fuzz.toll", text));
    let _ = checked.render(Style::Plain);
    let _ = checked.render(Style::Fancy);
    if let Some(compiled) = &checked.policy {
        assert_eq!(checked.errors(), 0);
        let terms = Terms::new(compiled);
        let _ = terms.discovery();
        for case in &checked.cases {
            let _ = case.run(compiled);
        }
    }

    let parsed = policy::parse(text);
    let Some(file) = parsed.file.filter(|_| parsed.diagnostics.is_empty()) else {
        return;
    };
    let formatted = fmt::format(&file, text);
    let again = policy::parse(&formatted);
    assert!(
        again.diagnostics.is_empty(),
        "the canonical form does not parse: {:?}\n--- canonical ---\n{formatted}",
        again.diagnostics
    );
    let Some(refile) = again.file else {
        panic!("the canonical form parsed to nothing:\n{formatted}");
    };
    assert!(
        refile == file,
        "parse(format(x)) != parse(x)\n--- canonical ---\n{formatted}"
    );
    let twice = fmt::format(&refile, &formatted);
    assert!(
        twice == formatted,
        "format is not idempotent\n--- format(x) ---\n{formatted}\n--- format(format(x)) ---\n{twice}"
    );
    let rechecked = policy::check(Source::new("fuzz.toll", formatted.as_str()));
    let codes = |c: &policy::Checked| {
        let mut codes: Vec<_> = c.diagnostics.iter().map(|d| d.code).collect();
        codes.sort_unstable();
        codes
    };
    assert_eq!(
        codes(&checked),
        codes(&rechecked),
        "the canonical form checks differently\n--- canonical ---\n{formatted}"
    );
    assert_eq!(checked.policy.is_some(), rechecked.policy.is_some());
});
