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

/// One export request: an encoded `ExportTraceServiceRequest` and the spans it holds.
struct Batch {
    body: Bytes,
    spans: u64,
    /// Position in the export order, for the delivery log.
    seq: u64,
}

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
    /// every drain of the ring buffer (at least every `capture.poll_interval_ms`).
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
    let (tx, rx) = mpsc::unbounded_channel();
    let transport = Transport::new(&settings)?;
    let queued = Arc::new(AtomicU64::new(0));
    let queue = SpanQueue {
        tx,
        queued: queued.clone(),
        capacity: settings.queue_spans as u64,
        batch: Vec::with_capacity(settings.batch_spans),
        batch_started: None,
        batch_spans: settings.batch_spans,
        batch_timeout: settings.batch_timeout,
        stats: stats.clone(),
        seq: 1,
        delivery: delivery.clone(),
    };
    let task = tokio::spawn(export_loop(rx, queued, transport, settings, stats, delivery));
    Ok((queue, task))
}

async fn export_loop(
    mut rx: mpsc::UnboundedReceiver<Batch>,
    queued: Arc<AtomicU64>,
    mut transport: Transport,
    settings: OtlpSettings,
    stats: Arc<Stats>,
    delivery: Arc<DeliveryLog>,
) {
    let mut outage = Outage::default();
    while let Some(batch) = rx.recv().await {
        queued.fetch_sub(batch.spans, Relaxed);
        let delivered = deliver(&mut transport, &settings, &stats, &batch, &rx, &mut outage).await;
        delivery.settle(batch.seq, delivered);
        if rx.is_closed() && outage.since.is_some() {
            // Shutting down with the collector failing: what is still queued cannot be sent in
            // time either. Count it rather than let the flush deadline lose it silently.
            let mut rest = 0;
            while let Ok(b) = rx.try_recv() {
                rest += b.spans;
                delivery.settle(b.seq, false);
            }
            Stats::add(&stats.spans_dropped_export_failed, rest);
            if rest > 0 {
                log::warn!("shutting down while the collector fails: dropped {rest} queued spans");
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
) -> bool {
    let n = batch.spans;
    let started = tokio::time::Instant::now();
    if outage.paused_until.is_some_and(|until| started < until) {
        Stats::add(&stats.spans_dropped_export_failed, n);
        return false;
    }
    let mut backoff = RETRY_INITIAL_BACKOFF;
    loop {
        match transport.send(settings, batch.body.clone()).await {
            Ok(()) => {
                outage.paused_until = None;
                Stats::add(&stats.spans_exported, n);
                if let Some(since) = outage.since.take() {
                    let dropped = dropped(stats) - outage.dropped_before;
                    log::info!(
                        "OTLP export recovered after {:.1} s; {dropped} spans were dropped meanwhile (counted in spans_dropped_*)",
                        since.elapsed().as_secs_f64()
                    );
                }
                return true;
            }
            Err(e) => {
                Stats::add(&stats.export_errors, 1);
                if outage.since.is_none() {
                    outage.since = Some(tokio::time::Instant::now());
                    outage.dropped_before = dropped(stats);
                    log::warn!(
                        "OTLP export to {} failing: {}; {} (queue holds {} spans, beyond that new spans are dropped and counted)",
                        settings.endpoint,
                        e.message,
                        if e.retryable {
                            "retrying with backoff"
                        } else if e.misconfigured {
                            "retrying cannot fix this: spans are dropped (counted as export_failed), one attempt every 5 s"
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
                    Stats::add(&stats.spans_dropped_export_failed, n);
                    log::debug!("dropped {n} spans: {}", e.message);
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
            }
        }
    }
}

fn dropped(stats: &Stats) -> u64 {
    Stats::get(&stats.spans_dropped_export_failed) + Stats::get(&stats.spans_dropped_queue_full)
}
