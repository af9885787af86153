//! How long the agent waits before it drains the ring buffer when the kernel has not woken it.
//!
//! The kernel wakes user space only once enough bytes are pending (`capture.wakeup_bytes`), so a
//! trickle of events is drained by a timer. While events flow the timer runs at
//! `capture.poll_interval_ms`; after each poll that found nothing it waits twice as long, up to
//! [`IDLE_POLL_MAX`]. An idle agent then wakes 5 times a second instead of 50. The first events
//! after a quiet spell wait at most that long; spans, metrics and log links do not depend on when
//! they are drained, only on their order.
//!
//! What user space must act on before the process runs on (a traced process's fork or exec, a
//! listen that may match a selector, a library mapped that needs TLS probes, an accept whose
//! addresses must be read from /proc) is not left to the timer: the kernel wakes the agent for
//! those records whatever is pending (`submit_now` in the eBPF programs). The exec of an
//! untraced process is not among them (it would wake the agent for every exec on the host).
//!
//! Traceparent injection is the exception: the kernel reads the context of the request a thread
//! serves from a map user space writes when it drains that request, so it keeps the configured
//! interval.

use std::time::Duration;

/// The longest wait between polls of an idle ring buffer.
pub const IDLE_POLL_MAX: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub struct PollPace {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl PollPace {
    /// `base`: the configured interval; `back_off`: whether idle polls may wait longer.
    pub fn new(base: Duration, back_off: bool) -> Self {
        let max = if back_off { base.max(IDLE_POLL_MAX) } else { base };
        Self { base, max, current: base }
    }

    /// The wait before the next poll, after a drain that read `events` records.
    pub fn after_drain(&mut self, events: usize) -> Duration {
        self.current = if events > 0 { self.base } else { (self.current * 2).min(self.max) };
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_polls_back_off_to_the_cap_and_events_restore_the_interval() {
        let mut pace = PollPace::new(Duration::from_millis(20), true);
        let waits: Vec<u128> = (0..6).map(|_| pace.after_drain(0).as_millis()).collect();
        assert_eq!(waits, [40, 80, 160, 200, 200, 200]);
        assert_eq!(pace.after_drain(3), Duration::from_millis(20));
        assert_eq!(pace.after_drain(0), Duration::from_millis(40));
    }

    #[test]
    fn without_back_off_or_above_the_cap_the_interval_stays() {
        let mut fixed = PollPace::new(Duration::from_millis(20), false);
        assert!((0..5).all(|_| fixed.after_drain(0) == Duration::from_millis(20)));
        let mut slow = PollPace::new(Duration::from_millis(500), true);
        assert_eq!(slow.after_drain(0), Duration::from_millis(500));
    }
}
