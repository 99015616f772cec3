//! Integration tests: one binary, so the crate and its dependencies link once.

// The sidecar config: defaults, file, environment overrides, every error message.
mod config;
