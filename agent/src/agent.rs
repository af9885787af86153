//! `sonde run`: wires capture, discovery, the pipeline and the exporters, and runs until a
//! shutdown signal. On shutdown it drains the ring buffer, detaches, and flushes exports.

use std::{collections::HashSet, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use crate::poll_pace::PollPace;
use crate::{
    capture::{
        Capture, Event,
        events::{decode, last_loss},
        loader::{CaptureOptions, SyscallHooks},
        tls_probes::TlsProbes,
    },
    config::{AgentConfig, PrintMode},
    conn::table::DataIn,
    discovery::{Action, Discovery, Origin, tls},
    export::{otlp, otlp_logs, otlp_metrics, print::Printer},
    logs::{LogSinks, LogStage, LogStream},
    metrics::{MetricsStore, prometheus},
    pipeline::{Pipeline, Sinks},
    stats::Stats,
    trace::{
        context::Injected,
        ids::{SpanId, TraceId},
    },
};
use sonde_common::{LOG_STREAM_FILE, LOG_STREAM_STDERR, LOG_STREAM_STDOUT, inject_reason};

/// Full /proc rescans, a safety net behind the exec/listen/fork events.
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);
/// How often the kernel's counters are read and logged-worthy state refreshed.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// Kernel map fill levels are counted key by key: every few housekeeping ticks only.
const MAP_FILL_TICKS: u64 = 5;
/// How long to wait for the exporter to flush on shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Safety net behind the mmap events: how often traced processes are re-checked for TLS libraries.
const TLS_RESCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Pending TLS library checks run at least this often while a large batch of events drains.
const TLS_CHECK_EVERY_EVENTS: u32 = 256;

struct Agent {
    capture: Capture,
    /// Where the OpenSSL uprobes are attached, and for which processes.
    tls_probes: TlsProbes,
    /// Processes whose TLS situation was already logged.
    tls_reported: HashSet<u32>,
    /// Processes that mapped new executable code since the last check for TLS libraries
    /// (a starting process maps dozens of libraries: one check covers them all).
    tls_pending: HashSet<u32>,
    /// `capture.tls`: attach the OpenSSL uprobes at all.
    tls_enabled: bool,
    discovery: Discovery,
    pipeline: Pipeline,
    stats: Arc<Stats>,
}

pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let mut capture = Capture::load(CaptureOptions {
        capture_bytes: cfg.capture.max_bytes,
        ring_buffer_bytes: cfg.capture.ring_buffer_bytes,
        wakeup_bytes: cfg.capture.wakeup_bytes,
        inject_http: cfg.inject_http.then(|| cfg.sampler.root_bound()),
        floor: cfg.floor,
        syscall_hooks: if cfg.paired_syscalls { SyscallHooks::Paired } else { SyscallHooks::ExitOnly },
        log_capture_bytes: cfg.logs.as_ref().map_or(0, |l| l.max_bytes),
        log_watch_opens: cfg.logs.as_ref().is_some_and(|l| !l.files.is_empty()),
    })
    .map_err(|e| match crate::check::missing_tracing_capabilities().as_slice() {
        [] => anyhow::anyhow!(e),
        missing => anyhow::anyhow!("{e}\nmissing capabilities: {} (grant them, or run as root)", missing.join(", ")),
    })?;
    if cfg.floor {
        log::warn!(
            "benchmark floor: {} tracepoints (and the TLS uprobes) run programs that only return; nothing is traced",
            capture.attached
        );
    } else {
        log::info!("attached {} eBPF programs (syscall and sched tracepoints)", capture.attached);
    }
    if let Some(injection) = &capture.injection {
        log::info!(
            "traceparent injection on: outgoing HTTP/1.x requests of traced processes (sockops on {}, sk_msg)",
            injection.cgroup.display()
        );
    }
    let ring = capture.take_ring().ok_or_else(|| anyhow::anyhow!("ring buffer already taken"))?;

    let metrics = Arc::new(MetricsStore::new(cfg.max_series));
    let mut sinks = Sinks::default();
    let mut exporter = None;
    if let Some(settings) = cfg.otlp.clone() {
        log::info!("exporting spans over OTLP to {}", settings.describe());
        let (queue, task) =
            otlp::start(settings, stats.clone(), metrics.delivery_log()).map_err(|e| anyhow::anyhow!(e))?;
        sinks.otlp = Some(queue);
        exporter = Some(task);
    }
    match cfg.print {
        PrintMode::Text => sinks.printer = Some(Printer::new(false)),
        PrintMode::Json => sinks.printer = Some(Printer::new(true)),
        PrintMode::None => {}
    }

    let mut log_stage = None;
    let mut log_exporter = None;
    if let Some(settings) = cfg.logs {
        let mut log_sinks = LogSinks::default();
        if let Some(otlp) = settings.otlp.clone() {
            log::info!("exporting log records over OTLP to {}", otlp.describe());
            let (queue, task) = otlp_logs::start(otlp, stats.clone()).map_err(|e| anyhow::anyhow!(e))?;
            log_sinks.otlp = Some(queue);
            log_exporter = Some(task);
        }
        match cfg.print {
            PrintMode::Text => log_sinks.printer = Some(Printer::new(false)),
            PrintMode::Json => log_sinks.printer = Some(Printer::new(true)),
            PrintMode::None => {}
        }
        log::info!(
            "capturing what traced processes write to stdout, stderr{}",
            if settings.files.is_empty() {
                String::new()
            } else {
                format!(" and {} log file globs", settings.files.len())
            }
        );
        log_stage = Some(LogStage::new(settings, log_sinks, stats.clone()));
    }

    let mut metrics_tasks = Vec::new();
    if let Some(addr) = cfg.prometheus {
        let endpoint = Arc::new(prometheus::Endpoint::new(metrics.clone(), stats.clone()));
        // Bind now so a bad address or a taken port is an error at start, not a silent log line.
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!("metrics.prometheus: cannot listen on {addr}: {e}; choose another port or address")
        })?;
        drop(listener);
        metrics_tasks.push(tokio::spawn(async move {
            if let Err(e) = prometheus::serve(addr, endpoint).await {
                log::error!("Prometheus endpoint on {addr} stopped: {e}");
            }
        }));
    }
    let mut metrics_flush = None;
    if let Some((settings, interval)) = cfg.otlp_metrics.clone() {
        log::info!("exporting metrics over OTLP to {} every {interval:?}", settings.describe());
        let (tx, rx) = tokio::sync::oneshot::channel();
        metrics_flush =
            Some((tx, tokio::spawn(otlp_metrics::run(settings, interval, metrics.clone(), stats.clone(), rx))));
    }

    let needs_pods = cfg.selectors.iter().chain(&cfg.excludes).filter(|s| s.needs_pod()).count();
    let pods = crate::k8s::start(&cfg.kubernetes, stats.clone()).await?;
    match &pods {
        None if cfg.selectors.iter().any(|s| s.needs_pod()) => anyhow::bail!(
            "a selector matches by pod (k8s_* or container_name), but no Kubernetes API is configured; \
             run in a pod with a service account, or set KUBECONFIG"
        ),
        Some(cache) => {
            crate::k8s::wait_for_first_list(cache).await;
        }
        None => log::debug!("no Kubernetes API configured; {needs_pods} pod criteria unused"),
    }
    let mut agent = Agent {
        capture,
        tls_probes: TlsProbes::default(),
        tls_reported: HashSet::new(),
        tls_pending: HashSet::new(),
        tls_enabled: cfg.capture.tls,
        discovery: Discovery::new(cfg.selectors, cfg.excludes, cfg.resource_attributes, cfg.service_name)
            .with_kubernetes(pods.clone(), cfg.kubernetes.clone()),
        pipeline: Pipeline::new(cfg.sampler, stats.clone(), sinks, metrics.clone()),
        stats: stats.clone(),
    };
    if agent.capture.injection.is_some() {
        agent.pipeline.enable_injection();
    }
    if let Some(stage) = log_stage {
        agent.pipeline.enable_logs(stage);
    }
    if let Some(cache) = &pods {
        agent.pipeline.name_peers(cache.clone());
    }
    let actions = agent.discovery.scan_all();
    agent.apply(actions);
    log::info!("tracing {} processes; waiting for more to match the selectors", agent.discovery.traced_count());

    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the event loop: {}", e.into_parts().1))?;
    let mut pace = PollPace::new(Duration::from_millis(cfg.capture.poll_interval_ms), !cfg.inject_http);
    let poll = tokio::time::sleep(Duration::from_millis(cfg.capture.poll_interval_ms));
    tokio::pin!(poll);
    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    rescan.tick().await;
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    let mut tls_rescan = tokio::time::interval(TLS_RESCAN_INTERVAL);
    let mut ticks: u64 = 0;
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let events = agent.drain(guard.get_inner_mut());
                guard.clear_ready();
                // Woken with events: the trickle that follows is polled at the base interval.
                poll.as_mut().reset(tokio::time::Instant::now() + pace.after_drain(events));
            }
            _ = &mut poll => {
                let events = agent.drain(ring.get_mut());
                poll.as_mut().reset(tokio::time::Instant::now() + pace.after_drain(events));
            }
            _ = rescan.tick() => {
                let actions = agent.discovery.scan_all();
                agent.apply(actions);
                for pid in agent.discovery.prune_dead() {
                    agent.forget_process(pid);
                }
            }
            _ = tls_rescan.tick() => agent.attach_tls_everywhere(),
            _ = pods_changed(pods.as_deref()) => {
                let actions = agent.discovery.on_pods_changed();
                agent.apply(actions);
            }
            _ = housekeeping.tick() => {
                ticks += 1;
                agent.refresh_counters();
                // First after one second, then every few seconds.
                if ticks % MAP_FILL_TICKS == 1 {
                    agent.refresh_map_fill();
                }
                if ticks.is_multiple_of(60) {
                    agent.pipeline.recalibrate_clock();
                }
            }
        }
    }

    log::info!("shutting down: draining events, detaching probes, flushing exports");
    agent.drain(ring.get_mut());
    agent.refresh_counters();
    drop(ring);
    let Agent { capture, pipeline, .. } = agent;
    drop(capture);
    // Dropping the pipeline queues the last partial batch and drops the queue's sender: the
    // exporter sends what is queued and ends.
    drop(pipeline);
    if let Some(task) = exporter
        && tokio::time::timeout(FLUSH_TIMEOUT, task).await.is_err()
    {
        log::warn!("exporter did not flush within {FLUSH_TIMEOUT:?}; remaining spans dropped");
    }
    if let Some(task) = log_exporter
        && tokio::time::timeout(FLUSH_TIMEOUT, task).await.is_err()
    {
        log::warn!("log exporter did not flush within {FLUSH_TIMEOUT:?}; remaining log records dropped");
    }
    if let Some((tx, task)) = metrics_flush {
        let _ = tx.send(());
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, task).await;
    }
    for t in metrics_tasks {
        t.abort();
    }
    log::info!("final counters: {}", stats.summary());
    Ok(())
}

/// Resolves when the pod cache changed; never without one.
async fn pods_changed(cache: Option<&crate::k8s::PodCache>) {
    match cache {
        Some(c) => c.changed().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Handles every record the ring holds; returns how many there were.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut since_tls_check = 0;
        let mut events = 0;
        while let Some(item) = ring.next() {
            events += 1;
            Stats::add(&self.stats.events_read, 1);
            self.pipeline.note_kernel_losses(last_loss(&item));
            match decode(&item) {
                Ok(ev) => self.handle(ev),
                Err(e) => {
                    Stats::add(&self.stats.events_undecodable, 1);
                    log::debug!("undecodable ring buffer record: {e}");
                }
            }
            since_tls_check += 1;
            if since_tls_check == TLS_CHECK_EVERY_EVENTS {
                since_tls_check = 0;
                self.check_pending_tls();
            }
        }
        self.check_pending_tls();
        self.pipeline.flush_exports_if_due();
        events
    }

    fn check_pending_tls(&mut self) {
        for pid in std::mem::take(&mut self.tls_pending) {
            self.attach_tls(pid, false);
        }
    }

    fn handle(&mut self, ev: Event<'_>) {
        match ev {
            Event::Data { pid, tid, fd, ts_ns, direction, byte_count, payload, uncopied: _, role, tls } => {
                log::trace!(
                    "data pid={pid} tid={tid} fd={fd} {direction:?} tls={tls} bytes={byte_count} {:?}",
                    String::from_utf8_lossy(&payload[..payload.len().min(48)])
                );
                let data = DataIn { dir: direction, payload, byte_count, ts_ns, tid, tls };
                self.pipeline.on_data(pid, fd, role, data);
            }
            Event::ConnOpen { pid, fd, ts_ns, role, listen_fd, peer, .. } => {
                self.pipeline.on_open(pid, fd, role, listen_fd, peer, ts_ns);
            }
            Event::ConnLocal { pid, fd, local } => self.pipeline.on_local_addr(pid, fd, local),
            Event::LogWrite { pid, tid, fd, ts_ns, stream, byte_count, payload } => {
                let stream = match stream {
                    LOG_STREAM_STDOUT => LogStream::Stdout,
                    LOG_STREAM_STDERR => LogStream::Stderr,
                    // A pending file is kept only if its open named a log file.
                    _ => LogStream::File,
                };
                self.pipeline.on_log_write(pid, tid, fd, stream, ts_ns, payload, byte_count);
            }
            Event::LogOpen { pid, fd, path } => self.classify_opened_file(pid, fd, path),
            Event::ConnClose { pid, fd, ts_ns } => self.pipeline.on_close(pid, fd, ts_ns),
            Event::ProcFork { parent, child, new_netns } => {
                // Threads are not adopted (they share their process's connections).
                if let Some(a) = self.discovery.on_fork(parent, child) {
                    self.pipeline.on_fork(parent, child, new_netns);
                    self.apply(vec![a]);
                }
            }
            Event::ProcExec { pid } => {
                if let Some(a) = self.discovery.on_exec(pid) {
                    self.apply(vec![a]);
                }
            }
            Event::Listen { pid } => {
                if let Some(a) = self.discovery.check_pid(pid) {
                    self.apply(vec![a]);
                }
            }
            Event::ProcExit { pid } => self.forget_process(pid),
            // A library was mapped: it may be (a copy of) libssl. The mapping exists by the time
            // this event is read.
            Event::ExecMapping { pid } => {
                self.tls_pending.insert(pid);
            }
            Event::Inject { pid, fd, reason, offset, trace_id, span_id, sampled, parent_id, key } => {
                if reason == inject_reason::INJECTED {
                    let injected = Injected {
                        offset,
                        trace_id: TraceId(trace_id),
                        span_id: SpanId(span_id),
                        parent_id: parent_id.map(SpanId),
                        sampled,
                    };
                    self.pipeline.on_injected(pid, fd, injected);
                } else if let Some(injection) = &mut self.capture.injection {
                    log::debug!(
                        "pid {pid} fd {fd}: traceparent injection gave the connection up ({})",
                        inject_reason::NAMES[reason as usize % inject_reason::NAMES.len()]
                    );
                    injection.release(&key);
                }
            }
        }
        if let Some(injection) = &mut self.capture.injection {
            for (pid_tgid, ctx) in self.pipeline.take_thread_contexts() {
                injection.set_thread_context(pid_tgid, ctx);
            }
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            let (pid, resource, sockets, origin, in_kernel) = match action {
                Action::Trace { pid, resource, sockets, origin } => (pid, resource, sockets, origin, false),
                Action::Adopt { pid, resource, sockets } => (pid, resource, sockets, Origin::Descendant, true),
                Action::Refresh { pid, resource } => {
                    if self.tls_enabled {
                        self.tls_probes.on_exec(&mut self.capture, pid);
                    }
                    // A new image may bring its own TLS library.
                    self.pipeline.set_resource(pid, resource);
                    self.tls_reported.remove(&pid);
                    self.attach_tls(pid, true);
                    continue;
                }
            };
            if !in_kernel && let Err(e) = self.capture.trace_pid(pid) {
                log::warn!("cannot trace pid {pid}: {e}");
                self.discovery.on_exit(pid);
                continue;
            }
            for s in &sockets {
                if let Err(e) = self.capture.track_socket(pid, s.fd, s.role) {
                    log::warn!("cannot track socket fd {} of pid {pid}: {e}", s.fd);
                }
                self.pipeline.open_seeded(pid, s);
            }
            // Selected processes are announced; children adopted in the kernel (one per
            // connection for fork-per-connection servers) only at debug level.
            let level = if in_kernel { log::Level::Debug } else { log::Level::Info };
            log::log!(
                level,
                "tracing pid {pid} as service {:?} ({} existing connections)",
                resource.service_name,
                sockets.len()
            );
            self.pipeline.set_resource(pid, resource);
            if !in_kernel {
                self.seed_log_fds(pid);
            }
            if self.tls_enabled {
                self.tls_probes.on_traced(&mut self.capture, pid, origin);
            }
            self.attach_tls(pid, !in_kernel);
        }
    }

    /// A traced process starts with its stdout, stderr and open log files as log fds (when log
    /// capture is on). Children adopted in the kernel inherit their parent's.
    fn seed_log_fds(&mut self, pid: u32) {
        let Some(logs) = self.pipeline.logs() else { return };
        let watch_files = logs.watches_files();
        let mut files = Vec::new();
        for (fd, stream) in [(1, LOG_STREAM_STDOUT), (2, LOG_STREAM_STDERR)] {
            // Output thrown away stays thrown away.
            match std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
                Ok(target) if target != std::path::Path::new("/dev/null") => {
                    if let Err(e) = self.capture.set_log_fd(pid, fd, stream) {
                        log::warn!("pid {pid}: cannot capture fd {fd}: {e}");
                    }
                }
                _ => {}
            }
        }
        if watch_files && let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for entry in dir.flatten() {
                let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                if fd <= 2 {
                    continue;
                }
                if let Ok(target) = std::fs::read_link(entry.path())
                    && let Some(path) = target.to_str()
                    && logs.is_log_file(path)
                {
                    files.push((fd, path.to_string()));
                }
            }
        }
        for (fd, path) in files {
            match self.capture.set_log_fd(pid, fd, LOG_STREAM_FILE) {
                Ok(()) => {
                    log::info!("pid {pid}: capturing log file {path}");
                    if let Some(logs) = self.pipeline.logs_mut() {
                        logs.add_file(pid, fd, &path);
                    }
                }
                Err(e) => log::warn!("pid {pid}: cannot capture log file {path}: {e}"),
            }
        }
    }

    /// A file a traced process opened write-only: a log file when its path matches
    /// `logs.files`; otherwise the kernel stops sending its writes.
    fn classify_opened_file(&mut self, pid: u32, fd: u32, raw: &[u8]) {
        let Some(logs) = self.pipeline.logs_mut() else { return };
        let given = String::from_utf8_lossy(raw);
        let path = if given.starts_with('/') {
            Some(given.into_owned())
        } else {
            // Relative to the process's directory: the fd tells where it is.
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok().and_then(|p| p.to_str().map(str::to_owned))
        };
        match path.filter(|p| logs.is_log_file(p)) {
            Some(path) => {
                logs.add_file(pid, fd, &path);
                log::debug!("pid {pid}: log file {path} opened as fd {fd}");
                if let Err(e) = self.capture.set_log_fd(pid, fd, LOG_STREAM_FILE) {
                    log::warn!("pid {pid}: cannot capture log file {path}: {e}");
                }
            }
            None => self.capture.forget_log_fd(pid, fd),
        }
    }

    fn attach_tls_everywhere(&mut self) {
        for pid in self.discovery.traced_pids() {
            self.attach_tls(pid, false);
        }
    }

    /// Attaches the TLS uprobes to the OpenSSL the process uses, and says per
    /// process what was found (at info level when `announce`, else debug).
    fn attach_tls(&mut self, pid: u32, announce: bool) {
        if !self.tls_enabled {
            return;
        }
        let mut found = Vec::new();
        for c in tls::candidates(pid) {
            if let Some(what) = self.tls_probes.ensure(&mut self.capture, pid, &c) {
                found.push(what);
            }
        }
        if self.tls_reported.insert(pid) {
            if !found.is_empty() {
                let level = if announce { log::Level::Info } else { log::Level::Debug };
                log::log!(level, "pid {pid}: TLS traced through {}", found.join("; "));
            } else if let Some(stack) = tls::unsupported_stack(pid) {
                log::warn!("pid {pid}: TLS by {stack}: its encrypted traffic is not traced");
            } else {
                log::debug!("pid {pid}: no TLS library found (plaintext traffic is traced)");
            }
        }
    }

    fn forget_process(&mut self, pid: u32) {
        self.tls_reported.remove(&pid);
        self.tls_pending.remove(&pid);
        self.tls_probes.forget(&mut self.capture, pid);
        self.discovery.on_exit(pid);
        self.pipeline.remove_process(pid);
        self.capture.untrace_pid(pid);
        self.capture.forget_sockets_of(pid);
        self.capture.forget_log_fds_of(pid);
    }

    fn refresh_counters(&mut self) {
        let k = self.capture.counters();
        let s = &self.stats;
        s.kernel_ringbuf_drops.store(k.ringbuf_drops, std::sync::atomic::Ordering::Relaxed);
        s.kernel_bytes_captured.store(k.bytes_captured, std::sync::atomic::Ordering::Relaxed);
        s.kernel_tls_events.store(k.tls_events, std::sync::atomic::Ordering::Relaxed);
        s.kernel_tls_no_fd.store(k.tls_no_fd, std::sync::atomic::Ordering::Relaxed);
        s.logs_dropped_kernel.store(k.log_drops, std::sync::atomic::Ordering::Relaxed);
        s.kernel_log_events.store(k.log_events, std::sync::atomic::Ordering::Relaxed);
        s.traced_processes.store(self.discovery.traced_count() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(injection) = &self.capture.injection {
            for (slot, n) in s.kernel_inject.iter().zip(injection.counts()) {
                slot.store(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        s.connections_tracked.store(self.pipeline.connection_count() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn refresh_map_fill(&mut self) {
        let fill = self.capture.map_fill();
        if let Ok(mut maps) = self.stats.kernel_maps.lock() {
            *maps = fill;
        }
    }
}
