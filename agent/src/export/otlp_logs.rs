//! OTLP log export: records are batched, encoded as an `ExportLogsServiceRequest` (one
//! ResourceLogs per process resource) and sent by the same exporter as spans, with its own
//! settings (`OTEL_EXPORTER_OTLP_LOGS_*`), bounded queue and counters.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord as OtlpLogRecord, ResourceLogs, ScopeLogs},
};
use prost::Message;
use tokio::sync::mpsc;

use super::{
    otlp::{Batch, OtlpSettings, SignalCounters, spawn_sender},
    otlp_encode::encode_resource,
};
use crate::{logs::LogRecord, stats::Stats, trace::resource::Resource};

const LOG_COUNTERS: SignalCounters = SignalCounters {
    exported: |s| &s.logs_exported,
    dropped_export_failed: |s| &s.logs_dropped_export_failed,
    dropped_queue_full: |s| &s.logs_dropped_queue_full,
    noun: "log records",
};

/// The pipeline's end of the log export queue: never blocks; a batch that does not fit in the
/// queue is dropped and counted.
pub struct LogQueue {
    tx: mpsc::UnboundedSender<Batch>,
    queued: Arc<AtomicU64>,
    capacity: u64,
    batch: Vec<LogRecord>,
    batch_started: Option<Instant>,
    batch_records: usize,
    batch_timeout: Duration,
    stats: Arc<Stats>,
}

/// Starts the log exporter; returns the queue and the task to await on shutdown.
pub fn start(settings: OtlpSettings, stats: Arc<Stats>) -> Result<(LogQueue, tokio::task::JoinHandle<()>), String> {
    let (capacity, batch_records, batch_timeout) =
        (settings.queue_spans as u64, settings.batch_spans, settings.batch_timeout);
    let (tx, queued, task) = spawn_sender(settings, stats.clone(), None, &LOG_COUNTERS)?;
    let queue = LogQueue {
        tx,
        queued,
        capacity,
        batch: Vec::with_capacity(batch_records),
        batch_started: None,
        batch_records,
        batch_timeout,
        stats,
    };
    Ok((queue, task))
}

impl LogQueue {
    pub fn push(&mut self, record: LogRecord) {
        if self.batch.is_empty() {
            self.batch_started = Some(Instant::now());
        }
        self.batch.push(record);
        if self.batch.len() >= self.batch_records {
            self.flush();
        }
    }

    pub fn flush_if_due(&mut self) {
        if self.batch_started.is_some_and(|t| t.elapsed() >= self.batch_timeout) {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        self.batch_started = None;
        let n = self.batch.len() as u64;
        if n == 0 {
            return;
        }
        if self.queued.load(Relaxed) + n > self.capacity {
            Stats::add(&self.stats.logs_dropped_queue_full, n);
        } else {
            let body = Bytes::from(encode(&self.batch).encode_to_vec());
            self.queued.fetch_add(n, Relaxed);
            if self.tx.send(Batch { body, spans: n, seq: 0 }).is_err() {
                self.queued.fetch_sub(n, Relaxed);
                Stats::add(&self.stats.logs_dropped_export_failed, n);
            }
        }
        self.batch.clear();
    }
}

impl Drop for LogQueue {
    fn drop(&mut self) {
        self.flush();
    }
}

fn string_attr(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }) }
}

fn encode_record(r: &LogRecord) -> OtlpLogRecord {
    let mut attributes = Vec::new();
    if let Some(stream) = r.stream.iostream() {
        attributes.push(string_attr("log.iostream", stream));
    }
    if let Some(path) = &r.file_path {
        attributes.push(string_attr("log.file.path", path));
        attributes.push(string_attr("log.file.name", path.rsplit('/').next().unwrap_or(path)));
    }
    let (trace_id, span_id, flags) = match &r.trace {
        Some(t) => (t.trace_id.0.to_vec(), t.span_id.0.to_vec(), u32::from(t.sampled)),
        None => (Vec::new(), Vec::new(), 0),
    };
    OtlpLogRecord {
        time_unix_nano: r.time_unix_ns,
        observed_time_unix_nano: r.observed_unix_ns,
        severity_number: r.severity.as_ref().map_or(0, |s| s.number),
        severity_text: r.severity.as_ref().map(|s| s.text.clone()).unwrap_or_default(),
        body: Some(AnyValue { value: Some(any_value::Value::StringValue(r.body.clone())) }),
        attributes,
        flags,
        trace_id,
        span_id,
        ..Default::default()
    }
}

/// One request for a batch: one ResourceLogs per distinct resource, in first-seen order.
pub fn encode(records: &[LogRecord]) -> ExportLogsServiceRequest {
    let mut groups: Vec<(Arc<Resource>, Vec<OtlpLogRecord>)> = Vec::new();
    for r in records {
        match groups.iter_mut().find(|(res, _)| Arc::ptr_eq(res, &r.resource) || **res == *r.resource) {
            Some((_, v)) => v.push(encode_record(r)),
            None => groups.push((r.resource.clone(), vec![encode_record(r)])),
        }
    }
    let scope =
        InstrumentationScope { name: "sonde".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
    ExportLogsServiceRequest {
        resource_logs: groups
            .into_iter()
            .map(|(res, log_records)| ResourceLogs {
                resource: Some(encode_resource(&res)),
                scope_logs: vec![ScopeLogs { scope: Some(scope.clone()), log_records, schema_url: String::new() }],
                schema_url: "https://opentelemetry.io/schemas/1.37.0".into(),
            })
            .collect(),
    }
}
