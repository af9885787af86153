//! Log records from what traced processes write (`logs.capture`): each writer's bytes become
//! records (`lines`), each record takes the trace of the request its thread served when its
//! first line was written (`trace::serving_thread`), credentials are redacted (`redact`), the
//! severity is read from the text (`severity`), and the records go to the printer and the OTLP
//! logs exporter. The application's own output is never changed.

pub mod lines;
pub mod redact;
pub mod severity;

use std::{collections::HashMap, collections::VecDeque, sync::Arc};

use lines::{Assembled, Writer};
pub use severity::Severity;

use crate::{
    config::LogSettings,
    export::{otlp_logs::LogQueue, print::Printer},
    stats::Stats,
    trace::{
        context::Lineage, ids::SpanId, ids::TraceId, join::Resolved, resource::Resource, serving_thread::ServingLink,
    },
};

/// Records waiting for their request's same-host join to resolve; beyond, the oldest goes
/// without a trace (counted as expired).
const MAX_HELD_RECORDS: usize = 4096;

/// Where a log fd writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
    File,
}

impl LogStream {
    pub fn iostream(self) -> Option<&'static str> {
        match self {
            LogStream::Stdout => Some("stdout"),
            LogStream::Stderr => Some("stderr"),
            LogStream::File => None,
        }
    }
}

/// The trace a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogTrace {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

#[derive(Clone, Debug)]
pub struct LogRecord {
    /// When the first byte of the record was written.
    pub time_unix_ns: u64,
    pub observed_unix_ns: u64,
    pub severity: Option<Severity>,
    pub body: String,
    pub stream: LogStream,
    pub file_path: Option<Arc<str>>,
    pub trace: Option<LogTrace>,
    pub resource: Arc<Resource>,
}

/// What the log stage needs from the tracer: the request a thread serves, the trace of a span
/// in progress, a process's resource, and the clock.
pub trait TraceView {
    fn serving(&self, pid: u32, tid: u32) -> ServingLink;
    fn resolve(&self, lineage: &Lineage) -> Resolved;
    fn resource(&self, pid: u32) -> Arc<Resource>;
    fn to_unix_ns(&self, monotonic_ns: u64) -> u64;
}

#[derive(Default)]
pub struct LogSinks {
    pub printer: Option<Printer>,
    pub otlp: Option<LogQueue>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct WriterKey {
    pid: u32,
    fd: u32,
    tid: u32,
}

struct WriterState {
    writer: Writer<ServingLink>,
    stream: LogStream,
    path: Option<Arc<str>>,
}

/// A record whose request's trace is still pending a same-host join.
struct Held {
    record: LogRecord,
    lineage: Lineage,
}

pub struct LogStage {
    settings: LogSettings,
    writers: HashMap<WriterKey, WriterState>,
    /// Paths of the log files each process has open, by (pid, fd).
    files: HashMap<(u32, u32), Arc<str>>,
    held: VecDeque<Held>,
    sinks: LogSinks,
    stats: Arc<Stats>,
    assembled: Vec<Assembled<ServingLink>>,
}

impl LogStage {
    pub fn new(settings: LogSettings, sinks: LogSinks, stats: Arc<Stats>) -> Self {
        Self {
            settings,
            writers: HashMap::new(),
            files: HashMap::new(),
            held: VecDeque::new(),
            sinks,
            stats,
            assembled: Vec::new(),
        }
    }

    /// Whether `path` is one of the configured log files.
    pub fn is_log_file(&self, path: &str) -> bool {
        self.settings.files.iter().any(|g| g.is_match(path))
    }

    pub fn watches_files(&self) -> bool {
        !self.settings.files.is_empty()
    }

    /// A log file `fd` of `pid` found open (or opened) at `path`.
    pub fn add_file(&mut self, pid: u32, fd: u32, path: &str) {
        self.files.insert((pid, fd), Arc::from(path));
    }

    /// A child starts with its parent's open log files.
    pub fn on_fork(&mut self, parent: u32, child: u32) {
        let inherited: Vec<(u32, Arc<str>)> =
            self.files.iter().filter(|((p, _), _)| *p == parent).map(|((_, fd), path)| (*fd, path.clone())).collect();
        for (fd, path) in inherited {
            self.files.insert((child, fd), path);
        }
    }

    /// One write of `pid`'s thread `tid` on log fd `fd`.
    #[expect(clippy::too_many_arguments, reason = "one write's fields, as the kernel reports them")]
    pub fn on_write(
        &mut self,
        view: &dyn TraceView,
        pid: u32,
        tid: u32,
        fd: u32,
        stream: LogStream,
        ts_ns: u64,
        payload: &[u8],
        byte_count: u64,
    ) {
        let path = match stream {
            LogStream::File => match self.files.get(&(pid, fd)) {
                Some(p) => Some(p),
                // A pending file user space did not classify as a log file.
                None => return,
            },
            _ => None,
        };
        let lost = byte_count.saturating_sub(payload.len() as u64);
        if lost > 0 {
            Stats::add(&self.stats.log_bytes_not_captured, lost);
        }
        let link = view.serving(pid, tid);
        // The path is shared only when a writer is new.
        let state = self.writers.entry(WriterKey { pid, fd, tid }).or_insert_with(|| WriterState {
            writer: Writer::default(),
            stream,
            path: path.cloned(),
        });
        let mut out = std::mem::take(&mut self.assembled);
        state.writer.write(payload, ts_ns, lost > 0, &link, &mut out);
        let (stream, path) = (state.stream, state.path.clone());
        for a in out.drain(..) {
            self.emit(view, pid, stream, path.clone(), a);
        }
        self.assembled = out;
    }

    /// `fd` of `pid` closed: its writers' last lines are complete.
    pub fn on_close(&mut self, view: &dyn TraceView, pid: u32, fd: u32) {
        self.files.remove(&(pid, fd));
        self.finish_where(view, |k| k.pid == pid && k.fd == fd);
    }

    /// The process exited.
    pub fn remove_process(&mut self, view: &dyn TraceView, pid: u32) {
        self.files.retain(|(p, _), _| *p != pid);
        self.finish_where(view, |k| k.pid == pid);
    }

    /// Completes records that waited long enough, releases held records whose trace is known,
    /// and queues the export batch when due. `now_ns` is the monotonic clock.
    pub fn tick(&mut self, view: &dyn TraceView, now_ns: u64) {
        let wait_ns = self.settings.flush.as_nanos() as u64;
        let mut out = std::mem::take(&mut self.assembled);
        let mut done = Vec::new();
        for (key, state) in &mut self.writers {
            if state.writer.flush_due(now_ns, wait_ns, &mut out) {
                done.push(*key);
            }
            for a in out.drain(..) {
                let path = state.path.clone();
                let (settings, stats, held, sinks) = (&self.settings, &self.stats, &mut self.held, &mut self.sinks);
                Self::emit_into(settings, stats, held, sinks, view, key.pid, state.stream, path, a);
            }
        }
        for key in done {
            self.writers.remove(&key);
        }
        self.assembled = out;
        self.release_held(view, false);
        if let Some(q) = &mut self.sinks.otlp {
            q.flush_if_due();
        }
    }

    /// Shutdown: everything still assembling or held goes out.
    pub fn finish(&mut self, view: &dyn TraceView) {
        self.finish_where(view, |_| true);
        self.release_held(view, true);
    }

    fn finish_where(&mut self, view: &dyn TraceView, pick: impl Fn(&WriterKey) -> bool) {
        let keys: Vec<WriterKey> = self.writers.keys().filter(|k| pick(k)).copied().collect();
        let mut out = std::mem::take(&mut self.assembled);
        for key in keys {
            if let Some(mut state) = self.writers.remove(&key) {
                state.writer.finish(&mut out);
                for a in out.drain(..) {
                    self.emit(view, key.pid, state.stream, state.path.clone(), a);
                }
            }
        }
        self.assembled = out;
    }

    fn emit(
        &mut self,
        view: &dyn TraceView,
        pid: u32,
        stream: LogStream,
        path: Option<Arc<str>>,
        a: Assembled<ServingLink>,
    ) {
        Self::emit_into(&self.settings, &self.stats, &mut self.held, &mut self.sinks, view, pid, stream, path, a);
    }

    #[expect(clippy::too_many_arguments, reason = "split borrows of the stage's fields")]
    fn emit_into(
        settings: &LogSettings,
        stats: &Stats,
        held: &mut VecDeque<Held>,
        sinks: &mut LogSinks,
        view: &dyn TraceView,
        pid: u32,
        stream: LogStream,
        file_path: Option<Arc<str>>,
        a: Assembled<ServingLink>,
    ) {
        let mut body = a.body;
        let redacted = settings.redaction.redact(&mut body);
        if redacted > 0 {
            Stats::add(&stats.logs_redacted, redacted);
        }
        let severity = severity_of(&body);
        let record = LogRecord {
            time_unix_ns: view.to_unix_ns(a.ts_ns),
            observed_unix_ns: view.to_unix_ns(crate::clock::Clock::monotonic_now()),
            severity,
            body,
            stream,
            file_path,
            trace: None,
            resource: view.resource(pid),
        };
        Stats::add(&stats.logs_captured, 1);
        match a.link {
            ServingLink::Outside => send(sinks, record),
            ServingLink::Ambiguous => {
                Stats::add(&stats.logs_unlinked_ambiguous, 1);
                send(sinks, record);
            }
            ServingLink::Request(lineage) => match view.resolve(&lineage) {
                Resolved::Known(ctx) => {
                    Stats::add(&stats.logs_linked, 1);
                    let trace = LogTrace { trace_id: ctx.trace_id, span_id: ctx.span_id, sampled: ctx.sampled };
                    send(sinks, LogRecord { trace: Some(trace), ..record });
                }
                Resolved::Pending { .. } => {
                    if held.len() >= MAX_HELD_RECORDS
                        && let Some(oldest) = held.pop_front()
                    {
                        Stats::add(&stats.logs_unlinked_expired, 1);
                        send(sinks, oldest.record);
                    }
                    held.push_back(Held { record, lineage });
                }
                Resolved::Expired => {
                    Stats::add(&stats.logs_unlinked_expired, 1);
                    send(sinks, record);
                }
            },
        }
    }

    /// Held records whose trace is known now (or, with `all`, every one) go out, in order.
    fn release_held(&mut self, view: &dyn TraceView, all: bool) {
        let mut still = VecDeque::new();
        while let Some(h) = self.held.pop_front() {
            match view.resolve(&h.lineage) {
                Resolved::Known(ctx) => {
                    Stats::add(&self.stats.logs_linked, 1);
                    let trace = LogTrace { trace_id: ctx.trace_id, span_id: ctx.span_id, sampled: ctx.sampled };
                    send(&mut self.sinks, LogRecord { trace: Some(trace), ..h.record });
                }
                Resolved::Pending { .. } if !all => still.push_back(h),
                _ => {
                    Stats::add(&self.stats.logs_unlinked_expired, 1);
                    send(&mut self.sinks, h.record);
                }
            }
        }
        self.held = still;
    }
}

impl Drop for LogStage {
    fn drop(&mut self) {
        if let Some(q) = &mut self.sinks.otlp {
            q.flush();
        }
    }
}

fn send(sinks: &mut LogSinks, record: LogRecord) {
    if let Some(p) = &mut sinks.printer {
        p.print_log(&record);
    }
    if let Some(q) = &mut sinks.otlp {
        q.push(record);
    }
}

/// A JSON object's level field, else a level stated in the first line.
fn severity_of(body: &str) -> Option<Severity> {
    if body.starts_with('{')
        && let Ok(severity) = severity::from_json(body)
    {
        return severity;
    }
    severity::from_text(body.lines().next().unwrap_or(""))
}
