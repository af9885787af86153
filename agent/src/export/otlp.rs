//! OTLP trace export over gRPC or HTTP/protobuf, configured from the OpenTelemetry environment
//! variables. The pipeline collects finished spans into batches and encodes each batch itself
//! (the spans are freed on the thread that built them, and a queued span costs its encoded
//! size, a few hundred bytes); the exporter task only sends bytes. The queue is bounded by the
//! spans it holds: a batch that does not fit is dropped and counted, so a dead backend costs
//! bounded memory and never blocks the pipeline. A batch the collector could not take for a
//! transient reason (unreachable, timeout, 429/502/503/504, gRPC UNAVAILABLE...) is retried with
//! exponential backoff for up to [`RETRY_MAX_ELAPSED`], then dropped and counted; a permanent
//! refusal (400, 413...) is dropped and counted at once; refused credentials or a TLS failure
//! also pause sending for [`PERMANENT_FAILURE_PAUSE`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::mpsc;

pub use super::settings::{OtlpProtocol, OtlpSettings, OtlpSettingsError, Signal};
use super::{otlp_wire, transport::Transport};

/// First wait before retrying a failed batch; doubles up to [`RETRY_MAX_BACKOFF`].
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one batch is retried before it is dropped (and counted) to make room for newer spans.
const RETRY_MAX_ELAPSED: Duration = Duration::from_secs(60);
/// After a failure that trying again cannot fix (refused credentials, an untrusted certificate),
/// batches are dropped without a request for this long: a wrong API key costs the collector
/// one request per pause, not one per batch.
const PERMANENT_FAILURE_PAUSE: Duration = Duration::from_secs(5);
use crate::{metrics::exemplars::DeliveryLog, stats::Stats, trace::span::Span};

/// One export request: an encoded export request and the items (spans, log records) it holds.
pub(crate) struct Batch {
    pub body: Bytes,
    pub spans: u64,
    /// Position in the export order, for the delivery log.
    pub seq: u64,
}

/// The counters one signal's exporter keeps, and what its items are called in its log lines.
pub(crate) struct SignalCounters {
    pub exported: fn(&Stats) -> &AtomicU64,
    pub dropped_export_failed: fn(&Stats) -> &AtomicU64,
    pub dropped_queue_full: fn(&Stats) -> &AtomicU64,
    pub noun: &'static str,
}

const SPAN_COUNTERS: SignalCounters = SignalCounters {
    exported: |s| &s.spans_exported,
    dropped_export_failed: |s| &s.spans_dropped_export_failed,
    dropped_queue_full: |s| &s.spans_dropped_queue_full,
    noun: "spans",
};

/// The pipeline's end of the export queue: never blocks. Spans are collected into a batch,
/// which is encoded and queued when it is full or [`SpanQueue::flush_if_due`] finds it older
/// than the batch timeout; whatever is left is queued when the handle is dropped.
pub struct SpanQueue {
    tx: mpsc::UnboundedSender<Batch>,
    /// Spans in queued batches (the exporter subtracts a batch when it takes it).
    queued: Arc<AtomicU64>,
    capacity: u64,
    batch: Vec<Span>,
    batch_started: Option<Instant>,
    batch_spans: usize,
    batch_timeout: Duration,
    stats: Arc<Stats>,
    /// Sequence number of the batch being filled (from 1).
    seq: u64,
    delivery: Arc<DeliveryLog>,
}

impl SpanQueue {
    /// The sequence number of the batch the next pushed span joins (exemplars wait for it).
    pub fn next_batch_seq(&self) -> u64 {
        self.seq
    }

    pub fn push(&mut self, span: Span) {
        if self.batch.is_empty() {
            self.batch_started = Some(Instant::now());
        }
        self.batch.push(span);
        if self.batch.len() >= self.batch_spans {
            self.flush();
        }
    }

    /// Queues a partial batch once its first span has waited the batch timeout. Called after
    /// every drain of the ring buffer (at least every `capture.poll_interval_ms`, or every
    /// `poll_pace::IDLE_POLL_MAX` while no events come).
    pub fn flush_if_due(&mut self) {
        if self.batch_started.is_some_and(|t| t.elapsed() >= self.batch_timeout) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.batch_started = None;
        let spans = self.batch.len() as u64;
        if spans == 0 {
            return;
        }
        let seq = self.seq;
        self.seq += 1;
        if self.queued.load(Relaxed) + spans > self.capacity {
            Stats::add(&self.stats.spans_dropped_queue_full, spans);
            self.delivery.settle(seq, false);
        } else {
            let body = Bytes::from(otlp_wire::encode(&self.batch));
            self.queued.fetch_add(spans, Relaxed);
            if self.tx.send(Batch { body, spans, seq }).is_err() {
                // The exporter has ended (only at shutdown).
                self.queued.fetch_sub(spans, Relaxed);
                Stats::add(&self.stats.spans_dropped_export_failed, spans);
                self.delivery.settle(seq, false);
            }
        }
        self.batch.clear();
    }
}

impl Drop for SpanQueue {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Starts the exporter task; returns the queue and the task to await on shutdown (after the
/// queue is dropped it sends what is left, then ends).
/// Each batch's outcome is written to `delivery`.
pub fn start(
    settings: OtlpSettings,
    stats: Arc<Stats>,
    delivery: Arc<DeliveryLog>,
) -> Result<(SpanQueue, tokio::task::JoinHandle<()>), String> {
    let capacity = settings.queue_spans as u64;
    let (batch_spans, batch_timeout) = (settings.batch_spans, settings.batch_timeout);
    let (tx, queued, task) = spawn_sender(settings, stats.clone(), Some(delivery.clone()), &SPAN_COUNTERS)?;
    let queue = SpanQueue {
        tx,
        queued,
        capacity,
        batch: Vec::with_capacity(batch_spans),
        batch_started: None,
        batch_spans,
        batch_timeout,
        stats,
        seq: 1,
        delivery,
    };
    Ok((queue, task))
}

/// The sending half of one signal's exporter: batches go into the channel, `queued` counts the
/// items waiting in it, and the task sends them (it ends once the sender is dropped and the
/// channel drained).
pub(crate) type Sender = (mpsc::UnboundedSender<Batch>, Arc<AtomicU64>, tokio::task::JoinHandle<()>);

pub(crate) fn spawn_sender(
    settings: OtlpSettings,
    stats: Arc<Stats>,
    delivery: Option<Arc<DeliveryLog>>,
    counters: &'static SignalCounters,
) -> Result<Sender, String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let transport = Transport::new(&settings)?;
    let queued = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(export_loop(rx, queued.clone(), transport, settings, stats, delivery, counters));
    Ok((tx, queued, task))
}

async fn export_loop(
    mut rx: mpsc::UnboundedReceiver<Batch>,
    queued: Arc<AtomicU64>,
    mut transport: Transport,
    settings: OtlpSettings,
    stats: Arc<Stats>,
    delivery: Option<Arc<DeliveryLog>>,
    counters: &'static SignalCounters,
) {
    let mut outage = Outage::default();
    let settle = |seq, delivered| {
        if let Some(d) = &delivery {
            d.settle(seq, delivered);
        }
    };
    while let Some(batch) = rx.recv().await {
        queued.fetch_sub(batch.spans, Relaxed);
        let delivered = deliver(&mut transport, &settings, &stats, &batch, &rx, &mut outage, counters).await;
        settle(batch.seq, delivered);
        if rx.is_closed() && outage.since.is_some() {
            // Shutting down with the collector failing: what is still queued cannot be sent in
            // time either. Count it rather than let the flush deadline lose it silently.
            let mut rest = 0;
            while let Ok(b) = rx.try_recv() {
                rest += b.spans;
                settle(b.seq, false);
            }
            Stats::add((counters.dropped_export_failed)(&stats), rest);
            if rest > 0 {
                log::warn!("shutting down while the collector fails: dropped {rest} queued {}", counters.noun);
            }
        }
    }
}

/// The collector has been failing since `since`; logged once when it starts and once when it ends.
#[derive(Default)]
struct Outage {
    since: Option<tokio::time::Instant>,
    dropped_before: u64,
    /// No request before this instant: the last failure was one that retrying cannot fix.
    paused_until: Option<tokio::time::Instant>,
}

/// Sends one batch, retrying transient failures with backoff; counts it exported or dropped.
/// True when the collector took it.
async fn deliver(
    transport: &mut Transport,
    settings: &OtlpSettings,
    stats: &Stats,
    batch: &Batch,
    rx: &mpsc::UnboundedReceiver<Batch>,
    outage: &mut Outage,
    counters: &SignalCounters,
) -> bool {
    let n = batch.spans;
    let noun = counters.noun;
    let started = tokio::time::Instant::now();
    if outage.paused_until.is_some_and(|until| started < until) {
        Stats::add((counters.dropped_export_failed)(stats), n);
        return false;
    }
    let mut backoff = RETRY_INITIAL_BACKOFF;
    loop {
        match transport.send(settings, batch.body.clone()).await {
            Ok(()) => {
                outage.paused_until = None;
                Stats::add((counters.exported)(stats), n);
                if let Some(since) = outage.since.take() {
                    let dropped = dropped(stats, counters) - outage.dropped_before;
                    log::info!(
                        "OTLP export recovered after {:.1} s; {dropped} {noun} were dropped meanwhile (counted in {noun}_dropped_*)",
                        since.elapsed().as_secs_f64()
                    );
                }
                return true;
            }
            Err(e) => {
                Stats::add(&stats.export_errors, 1);
                if outage.since.is_none() {
                    outage.since = Some(tokio::time::Instant::now());
                    outage.dropped_before = dropped(stats, counters);
                    log::warn!(
                        "OTLP export to {} failing: {}; {} (queue holds {} {noun}, beyond that new {noun} are dropped and counted)",
                        settings.endpoint,
                        e.message,
                        if e.retryable {
                            "retrying with backoff"
                        } else if e.misconfigured {
                            "retrying cannot fix this: batches are dropped (counted as export_failed), one attempt every 5 s"
                        } else {
                            "not retryable, batches dropped"
                        },
                        settings.queue_spans
                    );
                }
                let out_of_time = started.elapsed() + backoff > RETRY_MAX_ELAPSED;
                if e.misconfigured {
                    outage.paused_until = Some(tokio::time::Instant::now() + PERMANENT_FAILURE_PAUSE);
                }
                if !e.retryable || rx.is_closed() || out_of_time {
                    Stats::add((counters.dropped_export_failed)(stats), n);
                    log::debug!("dropped {n} {noun}: {}", e.message);
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
            }
        }
    }
}

fn dropped(stats: &Stats, counters: &SignalCounters) -> u64 {
    Stats::get((counters.dropped_export_failed)(stats)) + Stats::get((counters.dropped_queue_full)(stats))
}
