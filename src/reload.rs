//! The policy in force, and replacing it while serving (hot reload).
//!
//! [`Live`] holds the compiled policy and its x402 terms as one [`Loaded`] behind an
//! `ArcSwap`: a request takes the current one at its start and keeps it to its end, so a
//! reload never changes the rules under a request in flight, and readers take no lock.
//!
//! A reload re-reads the configured policy path, compiles it and checks that this build can
//! run it (the same checks as startup). Only then is it swapped in; an invalid policy is
//! refused with its diagnostics, logged, counted, and the old one keeps serving.
//!
//! Triggers: SIGHUP, the admin API (`POST /v1/policy/reload`), and a [`Watcher`] that re-reads
//! the file every [`WATCH_EVERY`] and reloads when its content changed — content, not
//! modification times, so Kubernetes ConfigMap updates (an atomic swap of a `..data` symlink)
//! are seen like any edit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::policy::{self, Backend, Policy};
use crate::x402::Terms;

/// How often the watcher re-reads the policy file.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// One compiled policy and everything derived from it.
pub struct Loaded {
    pub policy: Policy,
    pub terms: Terms,
    /// Each route's text (`GET /v1/forecast/{city}`), by route id: metric labels, limit
    /// scopes, ledger entries and the `x-tollgate-route` header, with no allocation per request.
    labels: Vec<String>,
    /// Unix seconds when it was swapped in.
    pub since: u64,
}

impl Loaded {
    /// A route's text (`GET /v1/forecast/{city}`), computed once per policy.
    pub fn label(&self, route: usize) -> &str {
        self.labels.get(route).map_or("", String::as_str)
    }

    fn new(policy: Policy, now: u64) -> Result<Loaded, String> {
        let terms = Terms::new(&policy);
        match &policy.settlement.backend {
            Backend::Facilitator { url } => {
                crate::settle::facilitator::check_supported(url, &policy, &terms)?;
            }
            Backend::Rpc { url, .. } => {
                if let Some(checked) = crate::settle::onchain::check(&policy, &terms)? {
                    tracing::info!(
                        node = %crate::settle::relayer::redact_url(url),
                        chain_id = checked.chain_id,
                        relayer = %checked.relayer,
                        gas_balance_wei = %checked.gas_balance,
                        "settlement node checked: chain, tokens, Multicall3, relayer gas"
                    );
                }
            }
            Backend::None => {}
        }
        Ok(Loaded {
            labels: policy.routes.iter().map(|r| r.display()).collect(),
            policy,
            terms,
            since: now,
        })
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file has the version already in force.
    Unchanged {
        version: String,
    },
    Swapped {
        from: String,
        to: String,
    },
}

/// The policy in force.
pub struct Live {
    current: ArcSwap<Loaded>,
    sources: Vec<PathBuf>,
    metrics: Arc<Metrics>,
    /// One reload at a time (the watcher, a signal and the admin API may race).
    reloading: Mutex<()>,
    /// What the file held at the last load attempt, by any trigger (a hash of its bytes, or
    /// why it could not be read): the watcher acts on a change, so a broken file is reported
    /// once, not every time it looks.
    seen: Mutex<Option<String>>,
}

impl Live {
    /// Loads the policy at startup; `Err` is what to tell the operator.
    pub fn start(sources: Vec<PathBuf>, metrics: Arc<Metrics>, now: u64) -> Result<Live, String> {
        let seen = fingerprint(&sources);
        let policy = load(&sources)?;
        metrics.policy_loaded(&policy);
        Ok(Live {
            current: ArcSwap::from_pointee(Loaded::new(policy, now)?),
            sources,
            metrics,
            reloading: Mutex::new(()),
            seen: Mutex::new(Some(seen)),
        })
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Re-reads and swaps the policy. `Err` carries the diagnostics; the old policy stays.
    pub fn reload(&self, now: u64) -> Result<Reloaded, String> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fingerprint(&self.sources));
        let before = self.current();
        let result = load(&self.sources).and_then(|policy| {
            if policy.service != before.policy.service {
                return Err(format!(
                    "{}: the service is now \"{}\", but this sidecar serves \"{}\"; restart it to change services",
                    policy.origin, policy.service, before.policy.service
                ));
            }
            Ok(policy)
        });
        let result = result.and_then(|policy| {
            if policy.version == before.policy.version {
                return Ok(Err(policy.version));
            }
            Loaded::new(policy, now).map(Ok)
        });
        match result {
            Ok(Err(version)) => {
                self.metrics.reloads.with(["unchanged"]).inc();
                Ok(Reloaded::Unchanged { version })
            }
            Ok(Ok(loaded)) => {
                let to = loaded.policy.version.clone();
                self.metrics.policy_loaded(&loaded.policy);
                self.current.store(Arc::new(loaded));
                self.metrics.reloads.with(["ok"]).inc();
                tracing::info!(from = %before.policy.version, to = %to, "policy reloaded");
                Ok(Reloaded::Swapped {
                    from: before.policy.version.clone(),
                    to,
                })
            }
            Err(diagnostics) => {
                self.metrics.reloads.with(["failed"]).inc();
                // The diagnostics quote the policy: a key pasted into it stays out of the log.
                tracing::error!(
                    version = %before.policy.version,
                    "the new policy is invalid; the policy in force keeps serving:\n{}",
                    crate::logging::redact_hex_secrets(&diagnostics)
                );
                Err(diagnostics)
            }
        }
    }

    /// Whether the file differs from what the last load attempt saw.
    fn changed(&self) -> bool {
        let now = fingerprint(&self.sources);
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            != Some(now.as_str())
    }
}

/// What the policy file holds: a hash of its bytes, or why it cannot be read.
fn fingerprint(sources: &[PathBuf]) -> String {
    match discover(sources)
        .and_then(|path| std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display())))
    {
        Ok(bytes) => alloy::hex::encode(Sha256::digest(&bytes)),
        Err(why) => format!("unreadable: {why}"),
    }
}

/// Finds the one policy file of this sidecar.
fn discover(sources: &[PathBuf]) -> Result<PathBuf, String> {
    let files: Vec<_> = policy::discover(sources)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|p| !policy::is_test_file(p))
        .collect();
    match files.as_slice() {
        [file] => Ok(file.clone()),
        _ => {
            let found = if files.is_empty() {
                "none".to_string()
            } else {
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(format!(
                "a sidecar serves exactly one service, so `policies` must name one policy file; found {found}"
            ))
        }
    }
}

/// Loads and checks the sidecar's one policy: it compiles, and its settlement is one this
/// build performs.
/// Warnings (`tollgate check` shows them in full) are logged, one line each.
pub fn load(sources: &[PathBuf]) -> Result<Policy, String> {
    let file = discover(sources)?;
    let source = policy::read(&file).map_err(|e| e.to_string())?;
    let mut checked = policy::check(source);
    let Some(policy) = checked.policy.take() else {
        return Err(policy::LoadError::Invalid(Box::new(checked)).to_string());
    };
    for warning in checked.diagnostics.iter().filter(|d| !d.is_error()) {
        let (line, column) = checked.source.line_col(warning.span.start);
        tracing::warn!(
            policy = %policy.origin,
            line,
            column,
            code = warning.code,
            help = warning.help.as_deref().unwrap_or(""),
            "policy warning: {}",
            warning.message
        );
    }
    Ok(policy)
}

/// Reloads on SIGHUP and when the policy file's content changes.
pub struct Watcher {
    pub live: Arc<Live>,
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::hangup(),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with the admin API");
                None
            }
        };
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let by_signal = tokio::select! {
                _ = shutdown.changed() => return,
                _ = hangup => true,
                () = tokio::time::sleep(WATCH_EVERY) => false,
            };
            if !by_signal {
                if !self.live.changed() {
                    continue;
                }
                tracing::info!("the policy file changed; reloading");
                let _ = self.live.reload(crate::unix_now());
            } else {
                tracing::info!("SIGHUP: reloading the policy");
                let _ = self.live.reload(crate::unix_now());
            }
        }
    }
}
