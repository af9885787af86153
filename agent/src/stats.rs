//! The agent's own counters: what it read, parsed, paired, exported and dropped. Drops are
//! counted at every stage so loss is never silent.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::capture::map_usage::MapFill;

#[derive(Debug, Default)]
pub struct Stats {
    pub events_read: AtomicU64,
    pub events_undecodable: AtomicU64,
    pub http_parse_errors: AtomicU64,
    pub postgres_parse_errors: AtomicU64,
    pub redis_parse_errors: AtomicU64,
    pub http2_parse_errors: AtomicU64,
    /// HTTP/2 header fields left out because they referred to compression state sonde never
    /// saw (connections seen mid-stream, header blocks not captured whole).
    pub http2_fields_undecodable: AtomicU64,
    /// Bytes that moved on traced connections beyond the per-syscall capture (capture.max_bytes):
    /// parsers skip them, and messages entirely inside them are not seen.
    pub bytes_not_captured: AtomicU64,
    /// Connections whose bytes matched no supported protocol.
    pub streams_unrecognized: AtomicU64,
    pub unmatched_requests: AtomicU64,
    pub unmatched_responses: AtomicU64,
    pub spans_created: AtomicU64,
    /// Server spans joined to their same-host client span.
    pub context_joined: AtomicU64,
    /// Spans left without the parent they may have had, by reason (`sonde_context_unlinked_total`).
    pub context_unlinked_ambiguous: AtomicU64,
    pub context_unlinked_other_thread: AtomicU64,
    pub context_unlinked_partner_missing: AtomicU64,
    pub context_unlinked_expired: AtomicU64,
    pub context_unlinked_before_start: AtomicU64,
    pub context_unlinked_desync: AtomicU64,
    pub context_unlinked_tls: AtomicU64,
    /// Server requests on a connection whose peer address sonde could not learn (an accept
    /// without an address buffer, the socket gone before /proc was read) while a traced client
    /// was connected to its address.
    pub context_unlinked_address_unknown: AtomicU64,
    /// Server requests waiting for their same-host client now, and the spans held meanwhile.
    pub joins_waiting: AtomicU64,
    pub spans_held: AtomicU64,
    /// CLIENT spans that carry the ids the kernel injected into their request.
    pub traceparent_matched: AtomicU64,
    /// Client requests with injection on that were not injected because their connection was
    /// open before sonde started.
    pub traceparent_skipped_before_start: AtomicU64,
    /// Copied from the kernel's injection counters, by `inject_reason`.
    pub kernel_inject: [AtomicU64; sonde_common::inject_reason::COUNT as usize],
    pub spans_unsampled: AtomicU64,
    pub spans_exported: AtomicU64,
    pub spans_dropped_queue_full: AtomicU64,
    pub spans_dropped_export_failed: AtomicU64,
    pub export_errors: AtomicU64,
    /// Copied from the kernel's per-CPU counters.
    pub kernel_ringbuf_drops: AtomicU64,
    pub kernel_bytes_captured: AtomicU64,
    pub kernel_tls_events: AtomicU64,
    /// TLS plaintext dropped because its socket was unknown.
    pub kernel_tls_no_fd: AtomicU64,
    pub traced_processes: AtomicU64,
    /// Connections the user-space connection table holds now.
    pub connections_tracked: AtomicU64,
    /// Log records made from what traced processes wrote (`logs.capture`).
    pub logs_captured: AtomicU64,
    pub logs_exported: AtomicU64,
    pub logs_dropped_queue_full: AtomicU64,
    pub logs_dropped_export_failed: AtomicU64,
    /// Log writes the kernel could not queue (ring buffer full), copied from its counters.
    pub logs_dropped_kernel: AtomicU64,
    pub kernel_log_events: AtomicU64,
    /// Bytes of log writes beyond `logs.max_bytes`: the rest of such a line is lost.
    pub log_bytes_not_captured: AtomicU64,
    /// Credentials replaced in log records.
    pub logs_redacted: AtomicU64,
    /// Records written inside a request that carry no trace: the thread served several
    /// requests at once, or the request's trace was forgotten before the line was complete.
    pub logs_unlinked_ambiguous: AtomicU64,
    pub logs_unlinked_expired: AtomicU64,
    /// Records that carry the trace of the request their thread served.
    pub logs_linked: AtomicU64,
    /// Pods of this node the Kubernetes cache holds now.
    pub k8s_pods_cached: AtomicU64,
    /// Failed Kubernetes API requests and watch errors (tracing goes on with the cache).
    pub k8s_api_errors: AtomicU64,
    /// Full relists after the first (410 Gone, or a watch that could not resume).
    pub k8s_relists: AtomicU64,
    /// Entries in the kernel's per-process/per-connection maps, refreshed every few seconds.
    pub kernel_maps: Mutex<Vec<MapFill>>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    /// Spans left without the parent they may have had, by reason label.
    pub fn unlinked(&self) -> [(&'static str, u64); 9] {
        let g = |c: &AtomicU64| c.load(Relaxed);
        [
            ("ambiguous", g(&self.context_unlinked_ambiguous)),
            ("other_thread", g(&self.context_unlinked_other_thread)),
            ("partner_missing", g(&self.context_unlinked_partner_missing)),
            ("expired", g(&self.context_unlinked_expired)),
            ("connection_before_start", g(&self.context_unlinked_before_start)),
            ("stream_desync", g(&self.context_unlinked_desync)),
            ("tls", g(&self.context_unlinked_tls)),
            ("address_unknown", g(&self.context_unlinked_address_unknown)),
            ("no_current_context", g(&self.kernel_inject[sonde_common::inject_reason::NO_CURRENT_CONTEXT as usize])),
        ]
    }

    /// One line for the log: every counter, named.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let unlinked: String = self.unlinked().iter().map(|(why, n)| format!(" context_unlinked_{why}={n}")).collect();
        let line = format!(
            "events_read={} events_lost={} events_undecodable={} bytes_captured={} bytes_not_captured={} tls_events={} tls_unattributed={} http_parse_errors={} postgres_parse_errors={} redis_parse_errors={} http2_parse_errors={} http2_fields_undecodable={} streams_unrecognized={} unmatched_requests={} unmatched_responses={} spans_created={} context_joined={} context_unlinked={} spans_unsampled={} spans_exported={} spans_dropped_queue_full={} spans_dropped_export_failed={} export_errors={} traced_processes={}",
            g(&self.events_read),
            g(&self.kernel_ringbuf_drops),
            g(&self.events_undecodable),
            g(&self.kernel_bytes_captured),
            g(&self.bytes_not_captured),
            g(&self.kernel_tls_events),
            g(&self.kernel_tls_no_fd),
            g(&self.http_parse_errors),
            g(&self.postgres_parse_errors),
            g(&self.redis_parse_errors),
            g(&self.http2_parse_errors),
            g(&self.http2_fields_undecodable),
            g(&self.streams_unrecognized),
            g(&self.unmatched_requests),
            g(&self.unmatched_responses),
            g(&self.spans_created),
            g(&self.context_joined),
            self.unlinked().iter().map(|(_, n)| n).sum::<u64>(),
            g(&self.spans_unsampled),
            g(&self.spans_exported),
            g(&self.spans_dropped_queue_full),
            g(&self.spans_dropped_export_failed),
            g(&self.export_errors),
            g(&self.traced_processes),
        );
        let inject: String = self.injection().iter().map(|(what, n)| format!(" traceparent_{what}={n}")).collect();
        let logs = format!(
            " logs_captured={} logs_linked={} logs_exported={} logs_dropped_queue_full={} logs_dropped_export_failed={} logs_dropped_kernel={} log_bytes_not_captured={} logs_redacted={} logs_unlinked_ambiguous={} logs_unlinked_expired={}",
            g(&self.logs_captured),
            g(&self.logs_linked),
            g(&self.logs_exported),
            g(&self.logs_dropped_queue_full),
            g(&self.logs_dropped_export_failed),
            g(&self.logs_dropped_kernel),
            g(&self.log_bytes_not_captured),
            g(&self.logs_redacted),
            g(&self.logs_unlinked_ambiguous),
            g(&self.logs_unlinked_expired),
        );
        let k8s = format!(
            " k8s_pods_cached={} k8s_api_errors={} k8s_relists={}",
            g(&self.k8s_pods_cached),
            g(&self.k8s_api_errors),
            g(&self.k8s_relists)
        );
        line + &unlinked + &inject + &logs + &k8s
    }

    /// Traceparent injection counts, named: the kernel's (`inject_reason`), CLIENT spans that
    /// took injected ids, and requests on connections older than sonde.
    pub fn injection(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let mut out: Vec<(&'static str, u64)> =
            sonde_common::inject_reason::NAMES.iter().copied().zip(self.kernel_inject.iter().map(g)).collect();
        out.push(("matched", g(&self.traceparent_matched)));
        out.push(("connection_before_start", g(&self.traceparent_skipped_before_start)));
        out
    }
}
