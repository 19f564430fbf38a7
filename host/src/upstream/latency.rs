//! QEMU's own time to answer: a histogram of command round trips on the link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket `i` counts round trips of at most 2^i µs; the last is about 67 s.
pub const BUCKETS: usize = 27;

/// Round trips from writing a command to QEMU to reading its reply, counted in
/// power-of-two buckets of microseconds (lock-free; written by the link task,
/// read by status).
#[derive(Debug, Default)]
pub struct RoundTrips {
    buckets: [AtomicU64; BUCKETS],
    /// Round trips longer than the last bucket.
    over: AtomicU64,
    sum_ns: AtomicU64,
}

impl RoundTrips {
    /// Counts one round trip.
    pub fn observe(&self, took: Duration) {
        let us = took.as_micros().max(1);
        // The smallest i with us <= 2^i.
        let i = (u128::BITS - (us - 1).leading_zeros()) as usize;
        match self.buckets.get(i) {
            Some(bucket) => bucket.fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_ns.fetch_add(
            took.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Per bucket: its upper bound in seconds and the cumulative count; then the
    /// total count and the sum in seconds (Prometheus' histogram shape).
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                cumulative += b.load(Ordering::Relaxed);
                ((1u64 << i) as f64 / 1e6, cumulative)
            })
            .collect();
        let count = cumulative + self.over.load(Ordering::Relaxed);
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (buckets, count, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_trip_lands_in_the_smallest_bucket_that_holds_it() {
        let h = RoundTrips::default();
        for us in [1, 2, 3, 4, 5, 1000, 100_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let (buckets, count, sum) = h.snapshot();
        let at = |bound_us: u64| {
            buckets
                .iter()
                .find(|(le, _)| (*le * 1e6).round() as u64 == bound_us)
                .unwrap()
                .1
        };
        assert_eq!((at(1), at(2), at(4), at(8), at(1024)), (1, 2, 4, 5, 6));
        assert_eq!(buckets.last().unwrap().1, 6, "100 s is over every bucket");
        assert_eq!(count, 7);
        assert!((sum - 100.001015).abs() < 1e-6, "{sum}");
    }
}
