//! `tollgate run`: assembling the sidecar from the configuration and running it.
//!
//! Startup checks everything before a port opens — the policy compiles, its settlement is one
//! this build performs, the upstream resolves, no other process listens on tollgate's
//! addresses, the store opens — and reports every problem in the operator's words. Then one Pingora server runs:
//! - the proxy ([`proxy::Gate`]) on `listen`;
//! - the ops listener on `ops.listen`: `/healthz` (the process is up) and `/readyz` (a policy
//!   is loaded and the store is open; false as soon as shutdown begins);
//! - the admin API ([`admin::service`]) on `admin.listen`, behind its bearer token;
//! - the settlement worker ([`crate::settle`]): deferred bundles, after the ledger was put
//!   right ([`Settlement::recover`]) before any port opened;
//! - a background task that forgets expired nonces and idempotency keys;
//! - the store watch: after a write failed (disk full, read-only), `/readyz` says so and
//!   `tollgate_store_up` is 0 while free routes go on; once the store's directory takes a
//!   write again, tollgate restarts in place ([`Stopped::Restart`]) to reopen and recover it
//!   ([`crate::store::health`]).
//!
//! Shutdown: SIGTERM stops accepting, lets in-flight requests finish ([`GRACE_PERIOD_SECS`]),
//! then flushes the store; SIGINT is a fast shutdown (the store is still flushed).

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use pingora::upstreams::peer::HttpPeer;

use crate::admin::{self, service::Admin};
use crate::config::{Config, Scheme};
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::proxy::listener::{Listener, Shared};
use crate::proxy::{BodyPace, Gate};
use crate::reload::{Live, Watcher};
use crate::settle::Settlement;
use crate::store::Store;

/// How a server that ran ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// A signal stopped it.
    Signal,
    /// The store failed and can write again: the caller starts the process anew in place
    /// (same PID, same arguments), which reopens the store and recovers the ledger as after
    /// any stop.
    Restart,
}

/// How often the store watch looks at the store's health, and probes a failed store's
/// directory.
const STORE_WATCH_EVERY: Duration = Duration::from_secs(1);

/// Seconds in-flight requests get to finish after SIGTERM, before runtimes stop. Keep below
/// Kubernetes' `terminationGracePeriodSeconds` (30 s by default).
pub const GRACE_PERIOD_SECS: u64 = 5;

/// Connections the ops listener (probes, scrapes) and the admin API hold at most: each is
/// capped apart from the proxy, so a flood on one cannot starve the others of descriptors.
const OPS_MAX_CONNECTIONS: usize = 256;
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// How often expired nonces are collected.
const NONCE_GC_EVERY: Duration = Duration::from_secs(600);

/// Runs the sidecar until it is told to stop. `Err` carries what to tell the operator.
pub fn run(config: &Config) -> Result<Stopped, String> {
    crate::logging::init(config);
    let metrics = Arc::new(Metrics::new().map_err(|e| format!("cannot set up the metrics: {e}"))?);
    // An invalid policy's diagnostics quote it; stderr is the log: a pasted key stays out.
    let live = Arc::new(
        Live::start(config.policies.clone(), metrics.clone(), crate::unix_now())
            .map_err(|e| crate::logging::redact_hex_secrets(&e).into_owned())?,
    );
    let upstream = upstream_peer(config)?;
    check_ports_free(config)?;
    let store = Store::open(&config.store)
        .map_err(|e| format!("cannot open the store at {}: {e}", config.store.display()))?;
    let token = admin::token::load_or_generate(config)?;
    metrics.store_up.set(1);
    // Payments are decided by a clock that never goes back, not even behind the books.
    let recorded = store
        .latest_time()
        .map_err(|e| format!("cannot read the store at {}: {e}", config.store.display()))?;
    let behind = crate::clock::start(recorded);
    let ahead = recorded.saturating_sub(crate::unix_now());
    if behind > 0 {
        tracing::warn!(
            behind_secs = behind,
            "this host's clock is behind the latest record in the store; payments are decided by the store's time until it catches up (check NTP)"
        );
    } else if ahead > 0 {
        tracing::error!(
            behind_secs = ahead,
            hold_secs = crate::clock::MAX_HOLD_SECS,
            "this host's clock is far behind the latest record in the store; following it (the books were written by a clock that ran ahead, or this one is wrong: check NTP)"
        );
    }
    let restart = Arc::new(Restart::default());

    let conf = ServerConf {
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        grace_period_seconds: Some(GRACE_PERIOD_SECS),
        graceful_shutdown_timeout_seconds: Some(5),
        upstream_keepalive_pool_size: 256,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    let loaded = live.current();
    let policy = &loaded.policy;
    tracing::info!(
        service = %policy.service,
        policy = %policy.origin,
        version = %policy.version,
        routes = policy.routes.len(),
        listen = %config.listen,
        upstream = %config.upstream.url,
        ops = %config.ops.listen,
        admin = %config.admin.listen,
        "tollgate starting"
    );
    let limiter = Arc::new(Limiter::default());
    let settlement = Settlement::new(
        store.clone(),
        limiter.clone(),
        metrics.clone(),
        live.clone(),
        config.settlement.rpc.as_deref(),
        crate::settle::relayer::Settings {
            confirmations: config.settlement.confirmations,
            max_fee_per_gas: config.settlement.max_fee_per_gas,
            replace_after: Duration::from_secs(config.settlement.replace_after_secs),
        },
    )?;
    recover(&settlement)?;
    let limits = &config.connections;
    let gate = Gate::new(
        live.clone(),
        store.clone(),
        upstream,
        config.public_url.clone(),
        limiter.clone(),
        metrics.clone(),
        settlement.clone(),
        BodyPace {
            timeout: Duration::from_secs(limits.body_timeout_secs),
            min_rate: limits.body_min_rate,
        },
    );
    let shared = Shared {
        ids: gate.request_ids(),
        live: live.clone(),
        metrics: metrics.clone(),
    };
    let listener = Listener::new(
        "proxy",
        pingora::proxy::http_proxy(&conf, gate),
        limits.clone(),
        connection_cap(limits),
        shared.clone(),
    );
    let mut proxy = Service::new("tollgate proxy".to_string(), listener);
    proxy.add_tcp(&config.listen.to_string());

    let ready = Arc::new(AtomicBool::new(true));
    let ops_app = Ops {
        ready: ready.clone(),
        metrics: metrics.clone(),
        store: store.clone(),
    };
    let ops_listener = Listener::new(
        "ops",
        ops_app,
        limits.clone(),
        OPS_MAX_CONNECTIONS,
        shared.clone(),
    );
    let mut ops = Service::new("tollgate ops".to_string(), ops_listener);
    ops.add_tcp(&config.ops.listen.to_string());
    ops.threads = Some(1);

    let admin_app = Admin {
        store: store.clone(),
        token,
        clock: crate::clock::now,
        live: live.clone(),
    };
    let admin_listener = Listener::new(
        "admin",
        admin_app,
        limits.clone(),
        ADMIN_MAX_CONNECTIONS,
        shared,
    );
    let mut admin = Service::new("tollgate admin".to_string(), admin_listener);
    admin.add_tcp(&config.admin.listen.to_string());
    admin.threads = Some(1);

    let mut gc = background_service(
        "housekeeping",
        Housekeeping {
            store: store.clone(),
            limiter,
        },
    );
    gc.threads = Some(1);
    let mut store_watch = background_service(
        "store watch",
        StoreWatch {
            store: store.clone(),
            metrics: metrics.clone(),
            restart: restart.clone(),
        },
    );
    store_watch.threads = Some(1);

    server.add_service(proxy);
    server.add_service(ops);
    server.add_service(admin);
    server.add_service(gc);
    server.add_service(store_watch);
    let mut settler = background_service("settlement", SettlementService(settlement));
    settler.threads = Some(1);
    server.add_service(settler);
    let mut watcher = background_service("policy watcher", Watcher { live });
    watcher.threads = Some(1);
    server.add_service(watcher);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            ready,
            restart: restart.clone(),
        }),
    });
    if restart.requested.load(Ordering::Acquire) {
        // What the failed store holds on disk is what it held; the new process recovers it.
        // Not dropped: a failed sled store cannot flush, and would only log that for every
        // tree; exec releases its files and its lock.
        std::mem::forget(store);
        tracing::warn!("tollgate stopped to reopen its store; starting again in place");
        return Ok(Stopped::Restart);
    }
    tracing::info!("tollgate stopped; flushing the store");
    store
        .flush()
        .map_err(|e| format!("flushing the store failed: {e}"))?;
    Ok(Stopped::Signal)
}

/// File descriptors kept out of the proxy's connection cap: the ops and admin listeners' own
/// caps, and 64 for listening sockets, the store, logs.
const RESERVED_FDS: u64 = 64 + OPS_MAX_CONNECTIONS as u64 + ADMIN_MAX_CONNECTIONS as u64;

/// The effective `connections.max`. The soft file-descriptor limit is raised to the hard one
/// first (as nginx's `worker_rlimit_nofile` and Go's runtime do); `auto` then allows what the
/// limit can hold with an upstream connection per client, at most
/// [`crate::config::DEFAULT_MAX_CONNECTIONS`]. An explicit `max` above that is kept, and warned
/// about: past it, accepting fails with `Too many open files`.
fn connection_cap(limits: &crate::config::ConnectionLimits) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut nofile = getrlimit(Resource::Nofile);
    if nofile.current < nofile.maximum {
        nofile.current = nofile.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, nofile) {
            tracing::debug!(error = %e, "cannot raise the file-descriptor limit");
        }
        nofile = getrlimit(Resource::Nofile);
    }
    // Two descriptors per client connection (its own and an upstream one), after what the
    // other listeners may hold; with a limit below ~1000 that leaves little, so never less
    // than a quarter of the limit.
    let fits = nofile.current.map_or(usize::MAX, |n| {
        let share = (n.saturating_sub(RESERVED_FDS) / 2).max(n / 4);
        usize::try_from(share).unwrap_or(usize::MAX)
    });
    let cap = match limits.max {
        None => crate::config::DEFAULT_MAX_CONNECTIONS.min(fits).max(1),
        Some(max) => {
            if max > fits {
                tracing::warn!(
                    connections_max = max,
                    file_descriptors = ?nofile.current,
                    "connections.max is more than the file-descriptor limit can hold (each client connection may need an upstream one); raise `ulimit -n`"
                );
            }
            max
        }
    };
    tracing::info!(connections_max = cap, file_descriptors = ?nofile.current, "connection limit");
    cap
}

/// Refuses to start when another process listens on one of tollgate's addresses. Pingora
/// would retry such a port for 30 s while `/readyz` said ready, then stop that service alone.
/// The probe binds as Pingora does (`SO_REUSEADDR`, so a restart's sockets in TIME_WAIT are
/// no obstacle) and releases the port at once.
fn check_ports_free(config: &Config) -> Result<(), String> {
    let listeners = [
        ("listen", config.listen),
        ("ops.listen", config.ops.listen),
        ("admin.listen", config.admin.listen),
    ];
    for (field, addr) in listeners {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let bound = socket
            .and_then(|s| s.set_reuseaddr(true).map(|()| s))
            .and_then(|s| s.bind(addr));
        if let Err(e) = bound {
            let why = if e.kind() == std::io::ErrorKind::AddrInUse {
                "another process listens there".to_string()
            } else {
                e.to_string()
            };
            return Err(format!("{field} {addr}: cannot listen: {why}"));
        }
    }
    Ok(())
}

/// The upstream as a Pingora peer, resolved once at startup.
fn upstream_peer(config: &Config) -> Result<HttpPeer, String> {
    let upstream = &config.upstream;
    if upstream.scheme == Scheme::Https {
        return Err(format!(
            "upstream {}: https upstreams are not supported yet; a sidecar reaches its service over loopback http",
            upstream.url
        ));
    }
    let host = upstream.host.trim_start_matches('[').trim_end_matches(']');
    let address = (host, upstream.port)
        .to_socket_addrs()
        .map_err(|e| format!("upstream {}: cannot resolve {host}: {e}", upstream.url))?
        .next()
        .ok_or_else(|| format!("upstream {}: {host} resolves to no address", upstream.url))?;
    let mut peer = HttpPeer::new(address, false, String::new());
    peer.options.connection_timeout = Some(Duration::from_secs(5));
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    Ok(peer)
}

/// `/healthz`, `/readyz` and `/metrics`. `/readyz` stays 200 while the store has failed
/// (free routes still serve: taking the pod out of rotation would stop them too) and says
/// what failed, since when, and what tollgate does about it.
struct Ops {
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    store: Store,
}

#[async_trait]
impl ServeHttp for Ops {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        if session.req_header().uri.path() == "/metrics" {
            self.metrics
                .store_bytes
                .set(i64::try_from(self.store.size_on_disk()).unwrap_or(i64::MAX));
            self.metrics
                .clock_behind
                .set(i64::try_from(crate::clock::wall_behind()).unwrap_or(i64::MAX));
            let body = self.metrics.render();
            return http::Response::builder()
                .status(200)
                .header("content-type", crate::metrics::CONTENT_TYPE)
                .header("content-length", body.len())
                .body(body)
                .unwrap_or_default();
        }
        let failure = self.store.failure();
        let degraded;
        let (status, body): (u16, &str) = match session.req_header().uri.path() {
            "/healthz" => (200, r#"{"status":"ok"}"#),
            "/readyz" if !self.ready.load(Ordering::Acquire) => {
                (503, r#"{"status":"shutting_down"}"#)
            }
            "/readyz" => match failure {
                None => (200, r#"{"status":"ready"}"#),
                Some(failure) => {
                    degraded = serde_json::json!({
                        "status": "degraded",
                        "store": {
                            "state": "failed",
                            "reason": failure.reason,
                            "since": failure.since,
                        },
                        "message": format!(
                            "the store at {} cannot write: paid and prepaid requests are refused (503) while free routes go on; tollgate restarts in place once the directory takes writes again",
                            self.store.dir().display()
                        ),
                    })
                    .to_string();
                    (200, degraded.as_str())
                }
            },
            _ => (
                404,
                r#"{"error":"not_found","message":"the ops listener serves /healthz, /readyz and /metrics"}"#,
            ),
        };
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(body.as_bytes().to_vec())
            .unwrap_or_default()
    }
}

/// Forgets nonces whose authorizations expired long ago, expired idempotency keys, and the
/// counters of limit windows that ended.
///
/// By the earlier of two clocks: the wall clock, and the wall clock at startup plus the time
/// the process has run (monotonic). A wall clock that jumps ahead (a bad NTP step, a VM
/// restored from a snapshot) must not forget nonces still valid in the real world, or their
/// authorizations would be admitted again once it is back.
struct Housekeeping {
    store: Store,
    limiter: Arc<Limiter>,
}

/// The earlier of `wall` and `started_wall + elapsed` (see [`Housekeeping`]).
fn collection_time(wall: u64, started_wall: u64, elapsed: Duration) -> u64 {
    wall.min(started_wall.saturating_add(elapsed.as_secs()))
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (started_wall, started) = (crate::unix_now(), std::time::Instant::now());
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(NONCE_GC_EVERY) => {}
            }
            let now = collection_time(crate::unix_now(), started_wall, started.elapsed());
            if let Err(e) = self.store.forget_expired_idempotency(now) {
                tracing::warn!(error = %e, "collecting expired idempotency keys failed");
            }
            if let Err(e) = self.store.forget_expired_spend(now) {
                tracing::warn!(error = %e, "collecting ended spend windows failed");
            }
            self.limiter.forget_expired(now);
            match self.store.forget_expired_nonces(now) {
                Ok(removed) => tracing::debug!(
                    removed,
                    held = self.store.nonce_count(),
                    "expired nonces collected"
                ),
                Err(e) => tracing::warn!(error = %e, "collecting expired nonces failed"),
            }
        }
    }
}

/// Watches the clock (a step back is logged once) and the store: `tollgate_store_up`, and once a failed store's directory takes a
/// write again, the restart that reopens it ([`crate::store::health`]).
struct StoreWatch {
    store: Store,
    metrics: Arc<Metrics>,
    restart: Arc<Restart>,
}

#[async_trait]
impl BackgroundService for StoreWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut probe_failed_with = None;
        let mut clock_was_behind = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(STORE_WATCH_EVERY) => {}
            }
            let behind = crate::clock::wall_behind();
            if behind > 1 && !clock_was_behind {
                tracing::warn!(
                    behind_secs = behind,
                    "this host's clock went back; payments are decided by the time already seen until it catches up (check NTP)"
                );
            }
            clock_was_behind = behind > 1;
            if self.store.failure().is_none() {
                continue;
            }
            self.metrics.store_up.set(0);
            let dir = self.store.dir().to_path_buf();
            let probe = tokio::task::spawn_blocking(move || crate::store::health::writable(&dir))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
            match probe {
                Ok(()) => {
                    tracing::warn!(
                        store = %self.store.dir().display(),
                        "the store's directory takes writes again; restarting in place to reopen the store"
                    );
                    self.restart.request();
                    return;
                }
                Err(e) => {
                    let why = e.to_string();
                    if probe_failed_with.as_ref() != Some(&why) {
                        tracing::warn!(store = %self.store.dir().display(), error = %why, "the store's directory still takes no writes");
                        probe_failed_with = Some(why);
                    }
                }
            }
        }
    }
}

/// A restart asked for from inside (the store watch), carried out as a graceful shutdown.
#[derive(Default)]
struct Restart {
    requested: AtomicBool,
    now: tokio::sync::Notify,
}

impl Restart {
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.now.notify_one();
    }
}

/// Puts the payment ledger right after a stop, before any port opens (see [`crate::settle`]).
fn recover(settlement: &Settlement) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    let recovery = runtime
        .block_on(settlement.recover())
        .map_err(|e| format!("cannot read the payment ledger: {e}"))?;
    if recovery.unresolved > 0 {
        tracing::warn!(
            unresolved = recovery.unresolved,
            "payments were being settled when tollgate stopped; they are unresolved until evidence from the chain decides them (tollgate ledger list --state unresolved)"
        );
    }
    tracing::info!(
        open = recovery.open,
        refunded = recovery.refunded,
        unresolved = recovery.unresolved,
        sales_credited = recovery.sales_credited,
        "payment ledger recovered"
    );
    Ok(())
}

/// The settlement worker as a Pingora background service (stopped with the server).
struct SettlementService(Settlement);

#[async_trait]
impl BackgroundService for SettlementService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await;
    }
}

/// Pingora's Unix signals and tollgate's own restart, with readiness dropped the moment a
/// shutdown is requested.
struct Signals {
    ready: Arc<AtomicBool>,
    restart: Arc<Restart>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let signal = tokio::select! {
            signal = pingora::server::UnixShutdownSignalWatch.recv() => signal,
            () = self.restart.now.notified() => ShutdownSignal::GracefulTerminate,
        };
        self.ready.store(false, Ordering::Release);
        tracing::info!(?signal, "shutdown requested; readiness is now false");
        signal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_never_runs_ahead_of_the_time_the_process_has_lived() {
        let hour = Duration::from_secs(3_600);
        // Clocks agree.
        assert_eq!(collection_time(1_000 + 3_600, 1_000, hour), 4_600);
        // The wall clock jumped a day ahead: collection keeps to the monotonic clock.
        assert_eq!(collection_time(1_000 + 3_600 + 86_400, 1_000, hour), 4_600);
        // The wall clock jumped back: collection keeps to the wall clock.
        assert_eq!(collection_time(1_000, 1_000, hour), 1_000);
    }
}
