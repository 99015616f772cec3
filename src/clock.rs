//! The time tollgate decides payments by: the wall clock, held against stepping back.
//!
//! An authorization is valid from `validAfter` to `validBefore` in the chain's time, which
//! follows the real world. A host clock stepped back (a bad NTP step, a VM restored from a
//! snapshot) would make an authorization that expired minutes ago look valid: tollgate would
//! admit it, and under `deferred` serve the call before the chain refuses the transfer. So
//! [`now`] is the later of:
//! - the wall clock;
//! - a base plus the time the process has run since it was taken (monotonic, which no clock
//!   step moves). The base is taken at startup ([`start`]): the wall clock then, or the time
//!   of the latest record in the store when the wall clock is behind it — so a clock already
//!   behind at startup runs on from the books' time.
//!
//! The hold is bounded by [`MAX_HOLD_SECS`]: a wall clock more than that behind is taken as a
//! clock that was wrong *ahead* (when tollgate started, or when the books were written) and has
//! been corrected, and is followed — otherwise one wrong reading would refuse every payment as
//! expired for as long as the error was. Either way `tollgate_clock_behind_seconds` and a
//! warning say so. A clock stepped *ahead* is taken as it is (authorizations look expired
//! sooner: refused, never served free); what must not forget a still-valid nonce uses the
//! earlier reading instead (`server::collection_time`), and settlement asks the chain's clock
//! before writing a payment off.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How far the held time may run ahead of the wall clock: beyond it, the wall clock is
/// followed (see the module).
pub const MAX_HOLD_SECS: u64 = 3_600;

/// The base and the monotonic instant it was taken at.
static BASE: OnceLock<(u64, Instant)> = OnceLock::new();

/// Takes the base: the wall clock, or `recorded` (the latest time in the books) when the wall
/// clock is behind it by at most [`MAX_HOLD_SECS`]. Returns how far the wall clock is behind
/// the base. Once per process, before the first payment (later calls change nothing).
pub fn start(recorded: u64) -> u64 {
    let wall = crate::unix_now();
    let &(base, _) = BASE.get_or_init(|| (base_at_start(wall, recorded), Instant::now()));
    base.saturating_sub(wall)
}

/// Seconds since the Unix epoch, held against stepping back (see the module).
pub fn now() -> u64 {
    let wall = crate::unix_now();
    let &(base, taken) = BASE.get_or_init(|| (wall, Instant::now()));
    held(wall, base, taken.elapsed())
}

/// How far the wall clock is behind [`now`], in seconds (0 when it is not).
pub fn wall_behind() -> u64 {
    now().saturating_sub(crate::unix_now())
}

fn base_at_start(wall: u64, recorded: u64) -> u64 {
    if recorded > wall && recorded - wall <= MAX_HOLD_SECS {
        recorded
    } else {
        wall
    }
}

/// The wall clock, or the base plus the time run since when that is later by at most
/// [`MAX_HOLD_SECS`].
fn held(wall: u64, base: u64, since: Duration) -> u64 {
    let run_on = base.saturating_add(since.as_secs());
    if run_on > wall && run_on - wall <= MAX_HOLD_SECS {
        run_on
    } else {
        wall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_stepped_back_is_held_to_the_time_already_run() {
        let (base, minute) = (100_000, Duration::from_secs(60));
        let ran = base + 60;
        // Running normally: the wall clock.
        assert_eq!(held(ran, base, minute), ran);
        // Stepped back 100 s after a minute: the base plus the minute.
        assert_eq!(held(ran - 100, base, minute), ran);
        // Stepped ahead: taken as it is.
        assert_eq!(held(ran + 5_000, base, minute), ran + 5_000);
        // Stepped back by more than the hold: the wall clock was wrong ahead, and is followed.
        assert_eq!(held(ran - MAX_HOLD_SECS, base, minute), ran);
        let far = ran - MAX_HOLD_SECS - 1;
        assert_eq!(held(far, base, minute), far);
    }

    #[test]
    fn a_clock_behind_the_books_at_startup_runs_on_from_the_books_time() {
        // Behind the latest record: the record's time is the base, and it runs on from there.
        let base = base_at_start(900, 1_000);
        assert_eq!(base, 1_000);
        assert_eq!(held(905, base, Duration::from_secs(5)), 1_005);
        assert_eq!(held(1_200, base, Duration::from_secs(300)), 1_300);
        // Ahead of the books: the wall clock.
        assert_eq!(base_at_start(1_100, 1_000), 1_100);
        // Books written by a clock that was far ahead: not held to them.
        assert_eq!(base_at_start(900, 900 + MAX_HOLD_SECS + 1), 900);
    }

    #[test]
    fn now_is_never_before_the_wall_clock() {
        assert!(now() >= crate::unix_now().saturating_sub(1));
        assert!(wall_behind() <= MAX_HOLD_SECS);
    }
}
