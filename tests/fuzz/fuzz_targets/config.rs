//! The sidecar configuration: any UTF-8 text as `tollgate.yaml`, resolved by
//! `config::Config::resolve` (what `Config::load` does after reading the file) with an empty
//! environment.
//!
//! Checked for every input: no panic, no hang (YAML aliases and merge keys included), every
//! error displays; a configuration that resolves prints (`Config::to_yaml`) as text that
//! resolves to the same configuration, as its documentation promises.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::Config;

fn no_env() -> std::iter::Empty<(String, String)> {
    std::iter::empty()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let resolved = match Config::resolve(Some(("fuzz.yaml", text)), no_env()) {
        Ok(resolved) => resolved,
        Err(errors) => {
            assert!(!errors.0.is_empty());
            let _ = errors.to_string();
            return;
        }
    };
    let yaml = resolved.config.to_yaml();
    match Config::resolve(Some(("canonical.yaml", &yaml)), no_env()) {
        Ok(again) => assert!(
            again.config == resolved.config,
            "to_yaml does not resolve to the same configuration\n--- input ---\n{text}\n--- to_yaml ---\n{yaml}\n--- first ---\n{:#?}\n--- again ---\n{:#?}",
            resolved.config,
            again.config
        ),
        Err(errors) => panic!(
            "to_yaml does not resolve: {errors}\n--- input ---\n{text}\n--- to_yaml ---\n{yaml}"
        ),
    }
});
