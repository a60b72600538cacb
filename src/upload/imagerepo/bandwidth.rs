//! The bandwidth cap of an `imagerepo` target (`bandwidth_limit`, bytes per second): a token
//! bucket shared by every chunk send of the target's uploads.
//!
//! Each piece of a chunk (at most 1 MiB) takes its size in tokens before it goes on the wire.
//! The bucket refills at `rate` tokens a second up to `burst` (one second's worth, and never
//! less than one piece, so a piece can always pass). A take that finds too few tokens reserves
//! them anyway (the balance goes negative) and sleeps until the balance is back at zero: takers
//! are served in the order they came, and the long-run rate never exceeds `rate`, whatever the
//! number of concurrent sends. The arithmetic ([`Bucket::take_at`]) is pure and tested with a
//! made-up clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The smallest burst: one piece of a chunk.
const MIN_BURST: f64 = (1 << 20) as f64;

/// The bucket's arithmetic, on an explicit clock.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket refilled at `rate` bytes a second.
    pub(crate) fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate.max(1) as f64;
        let burst = rate.max(MIN_BURST);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` tokens at `now`; how long the taker must wait before sending them.
    pub(crate) fn take_at(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A shared cap: `None` when the target has no `bandwidth_limit`.
#[derive(Debug, Default)]
pub(crate) struct Limiter(Option<Mutex<Bucket>>);

impl Limiter {
    /// A cap of `rate` bytes a second, or none.
    pub(crate) fn new(rate: Option<u64>) -> Limiter {
        Limiter(rate.map(|r| Mutex::new(Bucket::new(r, Instant::now()))))
    }

    /// Waits until `n` bytes may be sent.
    pub(crate) async fn take(&self, n: u64) {
        let Some(b) = &self.0 else { return };
        let wait = b
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_at(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_full_bucket_passes_its_burst_then_paces_at_the_rate() {
        let t0 = Instant::now();
        // 2 MiB/s: the burst is one second's worth.
        let mut b = Bucket::new(2 * MIB, t0);
        assert_eq!(b.take_at(MIB, t0), Duration::ZERO);
        assert_eq!(b.take_at(MIB, t0), Duration::ZERO);
        // Empty now: the next MiB waits half a second, the one after a whole second.
        assert_eq!(b.take_at(MIB, t0), Duration::from_millis(500));
        assert_eq!(b.take_at(MIB, t0), Duration::from_millis(1000));
        // Two seconds on, the debt (2 MiB) is paid and the bucket is full again (2 MiB).
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(b.take_at(MIB, t2), Duration::ZERO);
        assert_eq!(b.take_at(2 * MIB, t2), Duration::from_millis(500));
    }

    #[test]
    fn the_long_run_rate_holds_whatever_the_piece_sizes() {
        let t0 = Instant::now();
        let rate = 10 * MIB;
        let mut b = Bucket::new(rate, t0);
        // Send 100 MiB in uneven pieces, each taker starting when its wait ends.
        let mut now = t0;
        let mut sent = 0;
        let sizes = [MIB, 4096, 300_000, MIB / 2, 1];
        let mut i = 0;
        while sent < 100 * MIB {
            let n = sizes[i % sizes.len()];
            i += 1;
            now += b.take_at(n, now);
            sent += n;
        }
        // 100 MiB at 10 MiB/s, less the first second's burst: about 9 s.
        let secs = now.duration_since(t0).as_secs_f64();
        assert!((8.9..=9.1).contains(&secs), "{secs}");
    }

    #[test]
    fn a_slow_cap_still_passes_a_whole_piece() {
        let t0 = Instant::now();
        // 1 KiB/s: the bucket still holds a piece, so the first one goes at once.
        let mut b = Bucket::new(1024, t0);
        assert_eq!(b.take_at(MIB, t0), Duration::ZERO);
        assert_eq!(b.take_at(1024, t0), Duration::from_secs(1));
        // Idle time refills only up to the burst.
        let later = t0 + Duration::from_secs(1_000_000);
        assert_eq!(b.take_at(MIB, later), Duration::ZERO);
        assert!(b.take_at(MIB, later) > Duration::from_secs(1000));
    }
}
