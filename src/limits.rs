//! Buyer limits at run time: requests per window, spend per window, value not yet settled.
//!
//! A buyer is an x402 payer (by address) or a prepaid account. Limits come compiled from the
//! policy ([`Limits`]: the service's, with the route's own replacing those of the same kind);
//! a service limit counts the buyer across every route that inherits it, a route's own limit
//! counts it on that route alone.
//!
//! Windows are fixed and aligned to the Unix epoch (`per minute` runs from :00 to :59), so a
//! refusal can say exactly when to retry (`Retry-After`). Only admitted requests count:
//! [`Limiter::admit`] checks every limit and takes what it needs in one step, and
//! [`Limiter::finish`] gives back what a request did not end up spending.
//!
//! - requests per window: counted in memory (a restart forgives the current window);
//! - spend per window: counted in the store, so a daily cap survives restarts
//!   ([`Store::reserve_spend`]); a spend limit applies to the rail paying in its unit
//!   (credits for prepaid, the asset for x402);
//! - unsettled value (x402): the value admitted but not settled yet, held in memory while
//!   the request is in flight; for `deferred` settlement, until the payment's bundle settles
//!   ([`crate::settle`] takes over the hold, and re-holds every open deferred payment from the
//!   ledger at startup, so a restart does not reset it).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use alloy::primitives::Address;

use crate::policy::{LimitScope, Limits, Unit, window_text};

use crate::store::{Store, StoreError};

/// Who is buying.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BuyerId {
    Payer(Address),
    Account(u64),
}

impl fmt::Display for BuyerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuyerId::Payer(address) => write!(f, "{address}"),
            BuyerId::Account(id) => write!(f, "account:{id}"),
        }
    }
}

/// What one request costs, in the unit of its rail.
#[derive(Debug, Clone, Copy)]
pub enum Spent<'a> {
    Credits(u128),
    Asset { symbol: &'a str, atomic: u128 },
}

impl Spent<'_> {
    fn atomic(self) -> u128 {
        match self {
            Spent::Credits(n) | Spent::Asset { atomic: n, .. } => n,
        }
    }

    fn is_in(self, unit: &Unit) -> bool {
        match (self, unit) {
            (Spent::Credits(_), Unit::Credits) => true,
            (Spent::Asset { symbol, .. }, Unit::Asset { symbol: s, .. }) => symbol == s,
            _ => false,
        }
    }
}

/// A request over a limit: 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub code: &'static str,
    pub message: String,
    pub retry_after: u64,
}

/// Why admission stopped.
#[derive(Debug)]
pub enum Refused {
    Exceeded(Exceeded),
    Store(StoreError),
}

/// What admission took for one request, given back by [`Limiter::finish`].
#[derive(Debug, Default)]
pub struct Holds {
    spend: Vec<(Vec<u8>, u128)>,
    unsettled: Option<(BuyerId, String, u128)>,
}

impl Holds {
    /// Hands the request's unsettled-value hold over to settlement (a deferred payment stays
    /// unsettled after its request ends); [`Limiter::finish`] then leaves it held.
    pub fn hand_over_unsettled(&mut self) {
        self.unsettled = None;
    }

    /// Whether the request holds some of its buyer's unsettled value.
    pub fn holds_unsettled(&self) -> bool {
        self.unsettled.is_some()
    }
}

/// A request counter's key: (scope, buyer).
type CounterKey = (String, BuyerId);

/// One window's count: (window start, window length, requests admitted in it).
type Window = (u64, u64, u64);

/// Counters shared by every request of the process.
#[derive(Default)]
pub struct Limiter {
    requests: Mutex<HashMap<CounterKey, Window>>,
    /// (buyer, asset symbol) → value admitted and not settled yet.
    unsettled: Mutex<HashMap<(BuyerId, String), u128>>,
}

/// What a counter counts: the whole service (empty), or one route by its text
/// (`GET /v1/reports`) — never by its position, which a policy edit may change.
fn scope_id(scope: LimitScope, route: &str) -> &str {
    match scope {
        LimitScope::Service => "",
        LimitScope::Route => route,
    }
}

fn window_start(now: u64, window: u64) -> u64 {
    now - now % window.max(1)
}

/// Retry when the window that refused ends.
fn retry_after(now: u64, window: u64) -> u64 {
    window_start(now, window) + window.max(1) - now
}

fn spend_key(scope: &str, start: u64, unit: &Unit, buyer: &BuyerId) -> Vec<u8> {
    let unit = match unit {
        Unit::Credits => "credits",
        Unit::Asset { symbol, .. } => symbol.as_str(),
    };
    let mut key = start.to_be_bytes().to_vec();
    key.extend_from_slice(format!("{scope}\0{unit}\0{buyer}").as_bytes());
    key
}

/// One request, as the limits see it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub limits: &'a Limits,
    /// The route's text, `GET /v1/reports`.
    pub route: &'a str,
    pub buyer: &'a BuyerId,
    pub spent: Spent<'a>,
    pub now: u64,
}

impl Limiter {
    /// Checks every limit for one request and takes what it needs; nothing is taken when
    /// any limit refuses.
    pub fn admit(&self, store: &Store, ask: &Ask<'_>) -> Result<Holds, Refused> {
        let mut holds = Holds::default();
        let counted = self.count_request(ask.limits, ask.route, ask.buyer, ask.now)?;
        if let Err(refused) = self.take(store, ask, &mut holds) {
            self.finish(store, holds, false);
            if let Some(key) = counted {
                self.uncount_request(&key);
            }
            return Err(refused);
        }
        Ok(holds)
    }

    fn take(&self, store: &Store, ask: &Ask<'_>, holds: &mut Holds) -> Result<(), Refused> {
        let Ask {
            limits,
            route,
            buyer,
            spent,
            now,
        } = *ask;
        for limit in limits.spend.iter().filter(|l| spent.is_in(&l.max.unit)) {
            let start = window_start(now, limit.window_secs);
            let key = spend_key(scope_id(limit.scope, route), start, &limit.max.unit, buyer);
            let expires = start + limit.window_secs;
            match store.reserve_spend(&key, spent.atomic(), limit.max.atomic, expires) {
                Ok(Ok(())) => holds.spend.push((key, spent.atomic())),
                Ok(Err(_)) => {
                    return Err(Refused::Exceeded(Exceeded {
                        code: "spend_limit_exceeded",
                        message: format!(
                            "this buyer may spend at most {} {}; this call would exceed it",
                            limit.max,
                            window_text(limit.window_secs)
                        ),
                        retry_after: retry_after(now, limit.window_secs),
                    }));
                }
                Err(e) => return Err(Refused::Store(e)),
            }
        }
        if let Spent::Asset { symbol, atomic } = spent
            && let Some(max) = limits.unsettled.iter().find(|q| spent.is_in(&q.unit))
        {
            let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
            let held = unsettled
                .entry((buyer.clone(), symbol.to_string()))
                .or_default();
            if held.saturating_add(atomic) > max.atomic {
                return Err(Refused::Exceeded(Exceeded {
                    code: "unsettled_limit_exceeded",
                    message: format!(
                        "this buyer may have at most {max} not yet settled; retry when earlier calls have settled"
                    ),
                    retry_after: 1,
                }));
            }
            *held += atomic;
            holds.unsettled = Some((buyer.clone(), symbol.to_string(), atomic));
        }
        Ok(())
    }

    fn count_request(
        &self,
        limits: &Limits,
        route: &str,
        buyer: &BuyerId,
        now: u64,
    ) -> Result<Option<CounterKey>, Refused> {
        let Some(limit) = limits.requests else {
            return Ok(None);
        };
        let key = (scope_id(limit.scope, route).to_string(), buyer.clone());
        let start = window_start(now, limit.window_secs);
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let entry = requests
            .entry(key.clone())
            .or_insert((start, limit.window_secs, 0));
        if entry.0 != start {
            *entry = (start, limit.window_secs, 0);
        }
        if entry.2 >= limit.count {
            return Err(Refused::Exceeded(Exceeded {
                code: "rate_limited",
                message: format!(
                    "this buyer may make {} requests {}",
                    limit.count,
                    window_text(limit.window_secs)
                ),
                retry_after: retry_after(now, limit.window_secs),
            }));
        }
        entry.2 += 1;
        Ok(Some(key))
    }

    fn uncount_request(&self, key: &CounterKey) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = requests.get_mut(key) {
            entry.2 = entry.2.saturating_sub(1);
        }
    }

    /// Holds `atomic` of `buyer`'s unsettled value beyond a request: a deferred payment is
    /// unsettled until its bundle settles (and, at startup, every open deferred payment).
    pub fn hold_unsettled(&self, buyer: &BuyerId, symbol: &str, atomic: u128) {
        let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        *unsettled
            .entry((buyer.clone(), symbol.to_string()))
            .or_default() += atomic;
    }

    /// Gives back what [`Limiter::hold_unsettled`] (or a request's hold) took.
    pub fn release_unsettled(&self, buyer: &BuyerId, symbol: &str, atomic: u128) {
        let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        let key = (buyer.clone(), symbol.to_string());
        if let Some(held) = unsettled.get_mut(&key) {
            *held = held.saturating_sub(atomic);
            if *held == 0 {
                unsettled.remove(&key);
            }
        }
    }

    /// Ends a request: its unsettled value is no longer in flight, and when it was not charged
    /// (`charged` false: refused, not settled, refunded) its spend is given back.
    pub fn finish(&self, store: &Store, holds: Holds, charged: bool) {
        if let Some((buyer, symbol, atomic)) = holds.unsettled {
            self.release_unsettled(&buyer, &symbol, atomic);
        }
        if !charged {
            for (key, amount) in holds.spend {
                if let Err(e) = store.release_spend(&key, amount) {
                    tracing::warn!(error = %e, "giving back a spend reservation failed");
                }
            }
        }
    }

    /// Drops request counters of windows that ended.
    pub fn forget_expired(&self, now: u64) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        requests.retain(|_, (start, window, _)| *start + *window > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Quantity, RequestLimit, SpendLimit};

    fn store(name: &str) -> Store {
        let dir =
            std::env::temp_dir().join(format!("tollgate-limits-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Store::open(&dir).unwrap()
    }

    fn code(r: Result<Holds, Refused>) -> Option<(&'static str, u64)> {
        match r {
            Ok(_) => None,
            Err(Refused::Exceeded(e)) => Some((e.code, e.retry_after)),
            Err(Refused::Store(e)) => panic!("{e}"),
        }
    }

    fn usdc(atomic: u128) -> Spent<'static> {
        Spent::Asset {
            symbol: "USDC",
            atomic,
        }
    }

    /// Admits one request of `buyer` on `route` under `limits`.
    fn admit(
        limiter: &Limiter,
        store: &Store,
        limits: &Limits,
        (route, buyer, spent, now): (&str, &BuyerId, Spent<'_>, u64),
    ) -> Result<Holds, Refused> {
        let ask = Ask {
            limits,
            route,
            buyer,
            spent,
            now,
        };
        limiter.admit(store, &ask)
    }

    #[test]
    fn requests_per_window_refuse_with_the_time_left() {
        let store = store("requests");
        let limits = Limits {
            requests: Some(RequestLimit {
                count: 2,
                window_secs: 60,
                scope: LimitScope::Service,
            }),
            ..Limits::default()
        };
        let limiter = Limiter::default();
        let (one, two) = (BuyerId::Account(1), BuyerId::Account(2));
        let call = |route, buyer, now| {
            code(admit(
                &limiter,
                &store,
                &limits,
                (route, buyer, Spent::Credits(1), now),
            ))
        };
        assert_eq!(call("GET /a", &one, 120), None);
        assert_eq!(
            call("GET /b", &one, 130),
            None,
            "a service limit counts across routes"
        );
        assert_eq!(call("GET /a", &one, 135), Some(("rate_limited", 45)));
        assert_eq!(
            call("GET /a", &two, 135),
            None,
            "another buyer has its own count"
        );
        assert_eq!(call("GET /a", &one, 180), None, "a new window");
    }

    #[test]
    fn spend_per_window_applies_to_its_unit_and_gives_back_what_was_not_charged() {
        let store = store("spend");
        let limits = Limits {
            spend: vec![SpendLimit {
                max: Quantity {
                    unit: Unit::Asset {
                        symbol: "USDC".into(),
                        decimals: 6,
                    },
                    atomic: 25,
                },
                window_secs: 86_400,
                scope: LimitScope::Route,
            }],
            ..Limits::default()
        };
        let limiter = Limiter::default();
        let buyer = BuyerId::Payer(Address::repeat_byte(7));
        let call = |route, spent| admit(&limiter, &store, &limits, (route, &buyer, spent, 100));
        let first = call("GET /r", usdc(10)).unwrap();
        let second = call("GET /r", usdc(10)).unwrap();
        assert_eq!(
            code(call("GET /r", usdc(10))),
            Some(("spend_limit_exceeded", 86_300))
        );
        assert_eq!(
            code(call("GET /r", Spent::Credits(1000))),
            None,
            "credits are another unit"
        );
        assert_eq!(
            code(call("GET /other", usdc(10))),
            None,
            "a route limit counts on its route"
        );
        limiter.finish(&store, second, false);
        limiter.finish(&store, first, true);
        assert!(
            call("GET /r", usdc(10)).is_ok(),
            "the uncharged call was given back"
        );
        assert_eq!(store.forget_expired_spend(86_399).unwrap(), 0);
        assert_eq!(store.forget_expired_spend(86_400).unwrap(), 2);
    }

    #[test]
    fn unsettled_value_is_held_while_in_flight() {
        let store = store("unsettled");
        let limits = Limits {
            unsettled: vec![Quantity {
                unit: Unit::Asset {
                    symbol: "USDC".into(),
                    decimals: 6,
                },
                atomic: 15,
            }],
            ..Limits::default()
        };
        let limiter = Limiter::default();
        let buyer = BuyerId::Payer(Address::repeat_byte(7));
        let call = || admit(&limiter, &store, &limits, ("GET /r", &buyer, usdc(10), 1));
        let held = call().unwrap();
        assert_eq!(code(call()), Some(("unsettled_limit_exceeded", 1)));
        limiter.finish(&store, held, true);
        assert!(call().is_ok());
    }
}
