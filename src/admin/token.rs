//! The admin API's bearer token: where it comes from and how a presented one is checked.
//!
//! `admin.token` names it (`env:NAME` or a file). When it is not set, the sidecar keeps a
//! generated token in `<store>/admin.token` (mode 0600, created on first start), so the CLI on
//! the same machine finds it with no setup. Only the token's SHA-256 is held in memory after
//! loading; a presented token is hashed and compared in constant time.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Config, SecretRef};

/// The file name of the generated token inside the store directory.
pub const GENERATED_FILE: &str = "admin.token";

/// A loaded token, held as its hash.
#[derive(Clone)]
pub struct AdminToken {
    hash: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

impl AdminToken {
    pub fn new(token: &str) -> AdminToken {
        AdminToken {
            hash: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether an `Authorization` header value carries this token (`Bearer <token>`).
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(given) = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
        else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.trim_ascii()).into();
        given.ct_eq(&self.hash).into()
    }
}

/// Where the token lives for this configuration.
pub fn source(config: &Config) -> SecretRef {
    config
        .admin
        .token
        .clone()
        .unwrap_or_else(|| SecretRef::File(generated_path(&config.store)))
}

fn generated_path(store: &Path) -> PathBuf {
    store.join(GENERATED_FILE)
}

/// Reads the token text (for the CLI, which sends it). Never logged or shown.
pub fn read(source: &SecretRef) -> Result<String, String> {
    let text = match source {
        SecretRef::Env(name) => std::env::var(name).map_err(|_| {
            format!("admin.token names the environment variable {name}, which is not set")
        })?,
        SecretRef::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?,
    };
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(format!("the admin token in {source} is empty"));
    }
    Ok(token)
}

/// Loads the sidecar's token, generating `<store>/admin.token` when the config names none and
/// the file does not exist yet. Call after the store is open (its directory exists).
pub fn load_or_generate(config: &Config) -> Result<AdminToken, String> {
    let source = source(config);
    if config.admin.token.is_none() {
        let path = generated_path(&config.store);
        if !path.exists() {
            generate(&path)?;
            tracing::info!(path = %path.display(), "generated an admin token");
        }
    }
    read(&source).map(|t| AdminToken::new(&t))
}

fn generate(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for the admin token: {e}"))?;
    let token = format!("tga_{}", alloy::hex::encode(bytes));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot create the admin token file {}: {e}", path.display()))?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write the admin token file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let token = AdminToken::new("s3cret");
        assert!(token.admits(Some(b"Bearer s3cret")));
        assert!(token.admits(Some(b"bearer s3cret ")));
        assert!(!token.admits(Some(b"Bearer s3cre")));
        assert!(!token.admits(Some(b"Bearer s3cret2")));
        assert!(!token.admits(Some(b"s3cret")));
        assert!(!token.admits(Some(b"Basic s3cret")));
        assert!(!token.admits(None));
        assert_eq!(format!("{token:?}"), "AdminToken(…)");
    }
}
