//! Prometheus metrics: every family tollgate exports, and their text exposition.
//!
//! One [`Metrics`] per process, shared by the proxy, the admin API, the reloader and the ops
//! listener that serves it at `/metrics`. Label values are bounded by the policy (service,
//! route pattern, rail, outcome code, network, asset symbol, rejection code): never a payer
//! address, an account, a key, a request id or a path as sent. README "Metrics" lists them.

use crate::policy::Policy;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Seconds: 50 µs … 10 s, for verification, upstream and settlement latencies.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
    10.0,
];

/// Seconds: 1 s … 1 day, for settlement lag.
const LAG_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3_600.0, 21_600.0, 86_400.0,
];

/// Payments per bundle.
const BUNDLE_BUCKETS: [f64; 10] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0,
];

/// A counter family whose number of labels is part of its type: a call with the wrong number
/// does not compile (prometheus' `with_label_values` panics on it, on the request path).
#[derive(Clone)]
pub struct Counters<const N: usize>(IntCounterVec);

impl<const N: usize> Counters<N> {
    fn new(
        registry: &Registry,
        name: &str,
        help: &str,
        labels: [&str; N],
    ) -> Result<Self, prometheus::Error> {
        let family = IntCounterVec::new(Opts::new(name, help), &labels)?;
        registry.register(Box::new(family.clone()))?;
        Ok(Counters(family))
    }

    /// The series of these label values (created at zero when new).
    pub fn with(&self, labels: [&str; N]) -> IntCounter {
        self.0.with_label_values(&labels)
    }
}

/// A gauge family whose number of labels is part of its type (see [`Counters`]).
#[derive(Clone)]
pub struct Gauges<const N: usize>(IntGaugeVec);

impl<const N: usize> Gauges<N> {
    fn new(
        registry: &Registry,
        name: &str,
        help: &str,
        labels: [&str; N],
    ) -> Result<Self, prometheus::Error> {
        let family = IntGaugeVec::new(Opts::new(name, help), &labels)?;
        registry.register(Box::new(family.clone()))?;
        Ok(Gauges(family))
    }

    /// The series of these label values (created at zero when new).
    pub fn with(&self, labels: [&str; N]) -> IntGauge {
        self.0.with_label_values(&labels)
    }

    /// Forgets every series.
    pub fn reset(&self) {
        self.0.reset();
    }
}

pub struct Metrics {
    registry: Registry,
    /// `tollgate_requests_total{service, route, rail, outcome}`.
    pub requests: Counters<4>,
    /// `tollgate_challenges_total{route}`: 402s that offer terms.
    pub challenges: Counters<1>,
    /// `tollgate_payments_verified_total{network}`.
    pub payments_verified: Counters<1>,
    /// `tollgate_payments_rejected_total{reason}`.
    pub payments_rejected: Counters<1>,
    /// `tollgate_revenue_atomic_total{asset, network}`: settled x402 value, atomic units.
    pub revenue: Counters<2>,
    /// `tollgate_credits_debited_total`, `…_refunded_total`, `…_sold_total`.
    pub credits_debited: IntCounter,
    pub credits_refunded: IntCounter,
    pub credits_sold: IntCounter,
    /// `tollgate_settlements_total{result}`: `settled`, `refused`, `unavailable`.
    pub settlements: Counters<1>,
    /// `tollgate_settlement_queue_depth`: payments admitted and not settled yet.
    pub settlement_queue: IntGauge,
    pub settlement_seconds: Histogram,
    pub verification_seconds: Histogram,
    pub upstream_seconds: Histogram,
    /// `tollgate_limit_refusals_total{limit}`.
    pub limit_refusals: Counters<1>,
    /// `tollgate_policy_reloads_total{result}`: `ok`, `unchanged`, `failed`.
    pub reloads: Counters<1>,
    /// `tollgate_policy_info{service, version}` = 1 for the policy in force.
    pub policy_info: Gauges<2>,
    /// `tollgate_store_size_bytes`, refreshed at each scrape.
    pub store_bytes: IntGauge,
    /// `tollgate_store_up`: 1 while the store writes, 0 from its first failed write until
    /// tollgate restarts in place to reopen it (`store::health`).
    pub store_up: IntGauge,
    /// `tollgate_clock_behind_seconds`: how far this host's wall clock is behind the time
    /// payments are decided by ([`crate::clock`]); above 0 after a step back (up to the hold).
    /// Refreshed at each scrape.
    pub clock_behind: IntGauge,
    /// `tollgate_connections_open{listener}`: client connections open (`proxy`, `ops`,
    /// `admin`).
    pub connections_open: Gauges<1>,
    /// `tollgate_connections_rejected_total{listener}`: connections refused at the cap.
    pub connections_rejected: Counters<1>,
    /// `tollgate_client_timeouts_total{phase}`: requests cut off for a head (`head`) or a
    /// body (`body`) that arrived too slowly.
    pub client_timeouts: Counters<1>,
    /// `tollgate_ledger_facts_total{state}`: payment ledger facts recorded, by the state reached.
    pub ledger_facts: Counters<1>,
    /// `tollgate_payments_open{state}`: payments not final yet (recorded, queued, submitted,
    /// unresolved).
    pub payments_open: Gauges<1>,
    /// `tollgate_unsettled_atomic{asset, network}`: value admitted and not final yet, atomic
    /// units.
    pub unsettled: Gauges<2>,
    /// `tollgate_settlement_oldest_unsettled_seconds`: age of the oldest payment not final.
    pub oldest_unsettled_seconds: IntGauge,
    /// `tollgate_settlement_lag_seconds`: from recorded to confirmed.
    pub settlement_lag_seconds: Histogram,
    /// `tollgate_settlement_bundle_payments`: payments per submitted bundle.
    pub bundle_payments: Histogram,
    /// `tollgate_settlement_bundles_total{asset}` and `…_bundle_value_atomic_total{asset}`.
    pub bundles: Counters<1>,
    pub bundle_value: Counters<1>,
    /// `tollgate_settlement_gas_total`: gas used by the settlement transactions tollgate sent
    /// itself (`settle via rpc`), once per mined transaction.
    pub settlement_gas: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let single = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, prometheus::Error> {
                let h =
                    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let policy_info = Gauges::new(
            &registry,
            "tollgate_policy_info",
            "The policy in force (value 1).",
            ["service", "version"],
        )?;
        Ok(Metrics {
            requests: Counters::new(
                &registry,
                "tollgate_requests_total",
                "Requests answered, by route, rail (free, pass, x402, prepaid, none) and outcome (a stable code).",
                ["service", "route", "rail", "outcome"],
            )?,
            challenges: Counters::new(
                &registry,
                "tollgate_challenges_total",
                "402 challenges issued with payment terms.",
                ["route"],
            )?,
            payments_verified: Counters::new(
                &registry,
                "tollgate_payments_verified_total",
                "x402 payments that verified locally.",
                ["network"],
            )?,
            payments_rejected: Counters::new(
                &registry,
                "tollgate_payments_rejected_total",
                "x402 payments refused, by reason (the error code).",
                ["reason"],
            )?,
            revenue: Counters::new(
                &registry,
                "tollgate_revenue_atomic_total",
                "Settled x402 value in the asset's atomic units (USDC: 1e-6).",
                ["asset", "network"],
            )?,
            credits_debited: single("tollgate_credits_debited_total", "Prepaid credits debited.")?,
            credits_refunded: single(
                "tollgate_credits_refunded_total",
                "Prepaid credits given back because the upstream failed.",
            )?,
            credits_sold: single(
                "tollgate_credits_sold_total",
                "Prepaid credits sold for x402 payments.",
            )?,
            settlements: Counters::new(
                &registry,
                "tollgate_settlements_total",
                "Settlement calls, by result (settled; refused; unavailable: never sent; unknown: sent, no usable answer).",
                ["result"],
            )?,
            settlement_queue: gauge(
                "tollgate_settlement_queue_depth",
                "`after response` x402 payments whose request is waiting for its settlement.",
            )?,
            settlement_seconds: histogram(
                "tollgate_settlement_duration_seconds",
                "Time to settle one payment with the facilitator, or one transaction on chain (settle via rpc), until its confirmations.",
                &LATENCY_BUCKETS,
            )?,
            verification_seconds: histogram(
                "tollgate_verification_duration_seconds",
                "Time to verify one x402 payment locally (decode, match, EIP-712, recover).",
                &LATENCY_BUCKETS,
            )?,
            upstream_seconds: histogram(
                "tollgate_upstream_duration_seconds",
                "Time from forwarding a request to the upstream's response head.",
                &LATENCY_BUCKETS,
            )?,
            limit_refusals: Counters::new(
                &registry,
                "tollgate_limit_refusals_total",
                "Requests refused by a buyer limit, by limit (the error code).",
                ["limit"],
            )?,
            reloads: Counters::new(
                &registry,
                "tollgate_policy_reloads_total",
                "Policy reloads, by result (ok, unchanged, failed).",
                ["result"],
            )?,
            store_bytes: gauge(
                "tollgate_store_size_bytes",
                "Size of the embedded store on disk.",
            )?,
            store_up: gauge(
                "tollgate_store_up",
                "1 while the store writes; 0 after a write failed (disk full, read-only): paid and prepaid requests are refused until tollgate restarts in place.",
            )?,
            clock_behind: gauge(
                "tollgate_clock_behind_seconds",
                "Seconds this host's wall clock is behind the time payments are decided by (held against stepping back, by up to an hour); above 0 after the clock was stepped back.",
            )?,
            connections_open: Gauges::new(
                &registry,
                "tollgate_connections_open",
                "Client connections open, by listener (proxy, ops, admin).",
                ["listener"],
            )?,
            connections_rejected: Counters::new(
                &registry,
                "tollgate_connections_rejected_total",
                "Client connections refused because the listener's cap (connections.max for the proxy) was reached.",
                ["listener"],
            )?,
            client_timeouts: Counters::new(
                &registry,
                "tollgate_client_timeouts_total",
                "Requests cut off because their head or body arrived too slowly, by phase (head, body).",
                ["phase"],
            )?,
            ledger_facts: Counters::new(
                &registry,
                "tollgate_ledger_facts_total",
                "Payment ledger facts recorded, by the state the payment reached.",
                ["state"],
            )?,
            payments_open: Gauges::new(
                &registry,
                "tollgate_payments_open",
                "x402 payments whose settlement is not final, by state (recorded, queued, submitted, unresolved).",
                ["state"],
            )?,
            unsettled: Gauges::new(
                &registry,
                "tollgate_unsettled_atomic",
                "x402 value admitted whose settlement is not final, in the asset's atomic units.",
                ["asset", "network"],
            )?,
            oldest_unsettled_seconds: gauge(
                "tollgate_settlement_oldest_unsettled_seconds",
                "Age of the oldest x402 payment whose settlement is not final (0 when none).",
            )?,
            settlement_lag_seconds: histogram(
                "tollgate_settlement_lag_seconds",
                "Time from a payment's record to its confirmation.",
                &LAG_BUCKETS,
            )?,
            bundle_payments: histogram(
                "tollgate_settlement_bundle_payments",
                "Payments per submitted deferred bundle.",
                &BUNDLE_BUCKETS,
            )?,
            bundles: Counters::new(
                &registry,
                "tollgate_settlement_bundles_total",
                "Deferred settlement bundles submitted, by asset.",
                ["asset"],
            )?,
            bundle_value: Counters::new(
                &registry,
                "tollgate_settlement_bundle_value_atomic_total",
                "Value of submitted deferred bundles, in the asset's atomic units.",
                ["asset"],
            )?,
            settlement_gas: single(
                "tollgate_settlement_gas_total",
                "Gas used by settlement transactions tollgate sent through its relayer (settle via rpc).",
            )?,
            policy_info,
            registry,
        })
        .inspect(Metrics::zeros)
    }

    /// Creates the series whose labels are known in advance at zero, so dashboards and alerts
    /// see them before the first event.
    fn zeros(&self) {
        for state in crate::store::ledger::State::ALL {
            self.ledger_facts.with([state.as_str()]);
        }
        for state in ["recorded", "queued", "submitted", "unresolved"] {
            self.payments_open.with([state]);
        }
        for result in ["settled", "refused", "unavailable", "unknown"] {
            self.settlements.with([result]);
        }
        for result in ["ok", "unchanged", "failed"] {
            self.reloads.with([result]);
        }
        for phase in ["head", "body"] {
            self.client_timeouts.with([phase]);
        }
        for listener in ["proxy", "ops", "admin"] {
            self.connections_open.with([listener]);
            self.connections_rejected.with([listener]);
        }
        for limit in [
            "rate_limited",
            "spend_limit_exceeded",
            "unsettled_limit_exceeded",
        ] {
            self.limit_refusals.with([limit]);
        }
    }

    /// The text exposition (Prometheus format 0.0.4).
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Records the policy in force (and forgets the previous one's info line), and creates its
    /// routes' and networks' series at zero.
    pub fn policy_loaded(&self, policy: &Policy) {
        self.policy_info.reset();
        self.policy_info
            .with([policy.service.as_str(), policy.version.as_str()])
            .set(1);
        for route in &policy.routes {
            let Some(price) = route.price() else { continue };
            self.challenges.with([route.display().as_str()]);
            for offer in &price.offers {
                self.bundles.with([offer.asset.symbol.as_str()]);
                self.bundle_value.with([offer.asset.symbol.as_str()]);
                if let Some(network) = policy.networks.get(offer.network) {
                    self.unsettled
                        .with([offer.asset.symbol.as_str(), network.name.as_str()]);
                    self.payments_verified.with([network.name.as_str()]);
                    self.revenue
                        .with([offer.asset.symbol.as_str(), network.name.as_str()]);
                }
            }
        }
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
