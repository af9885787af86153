//! Kernel timestamps are CLOCK_MONOTONIC; spans need unix time. The offset between the two is
//! measured at start and re-measured periodically (NTP may step or slew the wall clock).

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - monotonic, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn calibrated() -> Self {
        // Bracket a realtime read between two monotonic reads; keep the tightest bracket.
        let mut best: Option<(i128, i128)> = None;
        for _ in 0..5 {
            let m1 = now(libc::CLOCK_MONOTONIC);
            let r = now(libc::CLOCK_REALTIME);
            let m2 = now(libc::CLOCK_MONOTONIC);
            let gap = m2 - m1;
            let offset = r - (m1 + gap / 2);
            if best.is_none_or(|(g, _)| gap < g) {
                best = Some((gap, offset));
            }
        }
        Self { offset_ns: best.map(|(_, o)| o).unwrap_or(0) }
    }

    pub fn to_unix_ns(&self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.offset_ns).max(0) as u64
    }

    /// The monotonic clock now, as the kernel's bpf_ktime_get_ns reads it.
    pub fn monotonic_now() -> u64 {
        now(libc::CLOCK_MONOTONIC) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_monotonic_now_to_wall_now() {
        let c = Clock::calibrated();
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128;
        let converted = c.to_unix_ns(Clock::monotonic_now()) as i128;
        assert!((wall - converted).abs() < 5_000_000, "off by {} ns", wall - converted);
    }
}
