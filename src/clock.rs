//! The time tollgate decides payments by: the wall clock, never earlier than a moment already
//! seen.
//!
//! An authorization is valid from `validAfter` to `validBefore` in the chain's time, which
//! follows the real world. A host clock stepped back (a bad NTP step, a VM restored from a
//! snapshot) would make an authorization that expired minutes ago look valid: tollgate would
//! admit it, and under `deferred` serve the call before the chain refuses the transfer. So
//! [`now`] is the latest of three readings:
//! - the wall clock;
//! - the wall clock at the first reading plus the time the process has run since (monotonic,
//!   which no clock step moves): a step back while running changes nothing;
//! - a floor from the books ([`not_before`]): at startup, the time of the latest record in the
//!   store, so a clock that is already behind when the process starts decides by the time the
//!   store last saw instead (from there it runs on the monotonic clock).
//!
//! A clock stepped *ahead* is taken as it is (authorizations look expired sooner: refused,
//! never served free); what must not forget a still-valid nonce uses the earlier reading
//! instead (`server::collection_time`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The wall clock and the monotonic clock at the first reading.
static FIRST: OnceLock<(u64, Instant)> = OnceLock::new();

/// No reading is earlier than this ([`not_before`]).
static FLOOR: AtomicU64 = AtomicU64::new(0);

/// Seconds since the Unix epoch, never earlier than a moment already seen (see the module).
pub fn now() -> u64 {
    let wall = crate::unix_now();
    let &(first_wall, first) = FIRST.get_or_init(|| (wall, Instant::now()));
    latest(
        wall,
        first_wall,
        first.elapsed(),
        FLOOR.load(Ordering::Relaxed),
    )
}

/// From now on, [`now`] is never earlier than `seen` (a time the books recorded).
pub fn not_before(seen: u64) {
    FLOOR.fetch_max(seen, Ordering::Relaxed);
}

/// How far the wall clock is behind [`now`], in seconds (0 when it is not).
pub fn wall_behind() -> u64 {
    now().saturating_sub(crate::unix_now())
}

/// The latest of the wall clock, the first reading plus the monotonic time since, and the floor.
fn latest(wall: u64, first_wall: u64, since_first: Duration, floor: u64) -> u64 {
    wall.max(first_wall.saturating_add(since_first.as_secs()))
        .max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_stepped_back_is_held_to_the_time_already_run() {
        let minute = Duration::from_secs(60);
        // Running normally: the wall clock.
        assert_eq!(latest(1_060, 1_000, minute, 0), 1_060);
        // Stepped back 100 s after a minute: still the first reading plus the minute.
        assert_eq!(latest(960, 1_000, minute, 0), 1_060);
        // Stepped ahead: taken as it is.
        assert_eq!(latest(5_000, 1_000, minute, 0), 5_000);
        // Behind the books at startup: the books' time.
        assert_eq!(latest(900, 900, Duration::ZERO, 1_000), 1_000);
    }

    #[test]
    fn the_floor_only_rises() {
        let before = now();
        not_before(before.saturating_sub(1_000));
        assert!(now() >= before);
        assert!(wall_behind() <= 1);
    }
}
