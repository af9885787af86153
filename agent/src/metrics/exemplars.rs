//! Exemplars: per histogram bucket, the trace and span id of one request that landed there,
//! shown only once the span is known to have reached the backend. An exemplar that points at a
//! trace never stored sends the operator to "trace not found", which is worse than none.
//!
//! A sampled span is offered when it is queued for export, tagged with the sequence number of
//! the export batch it joined. It waits as the bucket's *pending* exemplar until the exporter
//! settles that batch in the [`DeliveryLog`]: delivered, it becomes the bucket's exemplar;
//! dropped (queue full, export failed), it is discarded. A bucket holds one pending exemplar at
//! a time, so under steady load exemplars refresh as fast as batches are delivered.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub value: f64,
    pub time_unix_ns: u64,
}

/// What became of an export batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not settled yet (queued or being sent).
    Pending,
    Delivered,
    /// Dropped, or too old for the log to remember (then nothing can be proven).
    Dropped,
}

/// Batches whose outcome is remembered; at 512 spans per batch that is about 2M spans.
const SLOTS: usize = 4096;
const DELIVERED: u64 = 1;
const DROPPED: u64 = 2;

/// Outcomes of recent export batches, by sequence number (from 1), written by the exporter and
/// read by the metrics store without a lock: slot `seq % SLOTS` holds `seq << 2 | outcome`.
pub struct DeliveryLog {
    slots: Box<[AtomicU64]>,
}

impl Default for DeliveryLog {
    fn default() -> Self {
        Self { slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl DeliveryLog {
    pub fn settle(&self, seq: u64, delivered: bool) {
        let outcome = if delivered { DELIVERED } else { DROPPED };
        self.slots[seq as usize % SLOTS].store(seq << 2 | outcome, Ordering::Release);
    }

    pub fn outcome(&self, seq: u64) -> Outcome {
        let slot = self.slots[seq as usize % SLOTS].load(Ordering::Acquire);
        let (slot_seq, state) = (slot >> 2, slot & 3);
        match (slot_seq.cmp(&seq), state) {
            (std::cmp::Ordering::Equal, DELIVERED) => Outcome::Delivered,
            (std::cmp::Ordering::Equal, _) => Outcome::Dropped,
            // The slot still holds an older batch: this one is not settled yet.
            (std::cmp::Ordering::Less, _) => Outcome::Pending,
            // A newer batch took the slot: this outcome is forgotten.
            (std::cmp::Ordering::Greater, _) => Outcome::Dropped,
        }
    }
}

/// One bucket's exemplars.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BucketExemplar {
    /// From a span the backend accepted: safe to show.
    pub shown: Option<Exemplar>,
    /// Waiting for its batch to settle.
    pending: Option<(Exemplar, u64)>,
}

impl BucketExemplar {
    /// Resolves the pending exemplar if its batch has settled.
    pub fn settle(&mut self, log: &DeliveryLog) {
        if let Some((exemplar, seq)) = self.pending {
            match log.outcome(seq) {
                Outcome::Pending => {}
                Outcome::Delivered => {
                    self.shown = Some(exemplar);
                    self.pending = None;
                }
                Outcome::Dropped => self.pending = None,
            }
        }
    }

    /// Offers a span queued in batch `seq`; kept unless an earlier one is still in flight.
    pub fn offer(&mut self, exemplar: Exemplar, seq: u64, log: &DeliveryLog) {
        self.settle(log);
        if self.pending.is_none() {
            self.pending = Some((exemplar, seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: u8) -> Exemplar {
        Exemplar { trace_id: [n; 16], span_id: [n; 8], value: n as f64, time_unix_ns: n as u64 }
    }

    #[test]
    fn only_delivered_batches_show_their_exemplar() {
        let log = DeliveryLog::default();
        let mut bucket = BucketExemplar::default();
        bucket.offer(ex(1), 1, &log);
        bucket.settle(&log);
        assert_eq!(bucket.shown, None, "batch 1 is still in flight");
        // A newer span does not replace the one in flight (it would never settle under load).
        bucket.offer(ex(2), 2, &log);
        log.settle(1, true);
        bucket.settle(&log);
        assert_eq!(bucket.shown, Some(ex(1)));
        bucket.offer(ex(3), 3, &log);
        log.settle(3, false);
        bucket.settle(&log);
        assert_eq!(bucket.shown, Some(ex(1)), "a dropped batch's span is never shown");
        bucket.offer(ex(4), 4, &log);
        log.settle(4, true);
        bucket.settle(&log);
        assert_eq!(bucket.shown, Some(ex(4)));
    }

    #[test]
    fn forgotten_outcomes_count_as_dropped() {
        let log = DeliveryLog::default();
        assert_eq!(log.outcome(7), Outcome::Pending);
        log.settle(7, true);
        assert_eq!(log.outcome(7), Outcome::Delivered);
        log.settle(7 + SLOTS as u64, true);
        assert_eq!(log.outcome(7), Outcome::Dropped, "slot reused: cannot prove delivery");
        assert_eq!(log.outcome(7 + 2 * SLOTS as u64), Outcome::Pending);
    }
}
