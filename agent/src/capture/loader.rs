//! Loads sonde's eBPF programs, attaches them to their tracepoints, and owns the maps user space
//! writes (the PID filter, the socket map, settings) and reads (counters, the ring buffer).
//!
//! Dropping [`Capture`] detaches every program; if the agent dies, the kernel does the same when
//! its file descriptors close, so no probe outlives the agent.

use std::num::NonZeroU32;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        RawTracePoint, TracePoint, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use sonde_common::{
    LogFd, MAX_CAPTURE, ROLE_CLIENT, ROLE_SERVER, Settings, SocketHistory, SocketInfo, SocketKey, TRACED_FLAG_TRACED,
    counter::{self, COUNT},
};

use super::{
    inject::Injection,
    map_usage::{MapFill, MapUsage},
    traced_bits::{self, TracedBits},
    tracefs, verifier_log,
};
use crate::conn::Role;

/// Which processes a set of TLS uprobes fires in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsScope {
    /// Every process that maps the file (the kernel plants breakpoints in all of them).
    AllProcesses,
    /// One process (breakpoints are planted in that process only).
    Process(u32),
}

/// The uprobe links of one [`Capture::attach_tls`] call.
#[derive(Debug)]
pub struct TlsLinks {
    links: Vec<(&'static str, UProbeLinkId)>,
    /// OpenSSL functions probed.
    pub symbols: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsAttachError {
    #[error("no OpenSSL SSL_read/SSL_read_ex symbol in the file")]
    NoOpenSsl,
    #[error("{0}")]
    Failed(String),
}

/// (OpenSSL symbol, sonde program): entry probes record the call, return probes emit the data.
const TLS_ATTACHMENTS: &[(&str, &str)] = &[
    ("SSL_read", "ssl_read_enter"),
    ("SSL_read", "ssl_rw_exit"),
    ("SSL_read_ex", "ssl_read_ex_enter"),
    ("SSL_read_ex", "ssl_rw_exit"),
    ("SSL_write", "ssl_write_enter"),
    ("SSL_write", "ssl_rw_exit"),
    ("SSL_write_ex", "ssl_write_ex_enter"),
    ("SSL_write_ex", "ssl_rw_exit"),
    ("SSL_do_handshake", "ssl_handshake_enter"),
    ("SSL_do_handshake", "ssl_handshake_exit"),
];

/// The floor program standing in for a TLS probe: return probes end in `_exit`.
fn name_of_floor_uprobe(program: &str) -> &'static str {
    if program.ends_with("_exit") { FLOOR_URETPROBE } else { FLOOR_UPROBE }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, CaptureError> {
    ebpf.program_mut(name).ok_or_else(|| CaptureError::Attach {
        program: name.to_owned(),
        category: "program",
        name: name.to_owned(),
        detail: "missing from the eBPF object".into(),
    })
}

/// sonde's eBPF object, as built (empty with AYA_BUILD_SKIP).
pub fn probes_object() -> &'static [u8] {
    PROBES
}

/// Loaded and attached only when injection is on (see `capture::inject`).
const INJECT_PROGRAMS: &[&str] = &["sonde_inject", "sonde_sockops"];
/// Programs that only return, for the benchmark's floor arm.
const FLOOR_TRACEPOINT: &str = "floor_tracepoint";
const FLOOR_UPROBE: &str = "floor_uprobe";
const FLOOR_URETPROBE: &str = "floor_uretprobe";
const FLOOR_RAW_TRACEPOINT: &str = "floor_raw_tracepoint";
const FLOOR_PROGRAMS: &[&str] = &[FLOOR_TRACEPOINT, FLOOR_UPROBE, FLOOR_URETPROBE, FLOOR_RAW_TRACEPOINT];
/// The raw tracepoint on every syscall's exit that captures the data syscalls (`exit.rs`).
const RAW_SYS_EXIT: &str = "raw_sys_exit";
/// The same, reading fewer iovecs per call: loaded where the verifier refuses the full one.
const RAW_SYS_EXIT_COMPACT: &str = "raw_sys_exit_compact";
/// The exit of accept, accept4 and connect, tail-called by the exit program from slot 0 of
/// [`CONN_EXIT_TABLE`] (a program of its own so the verifier checks it apart from the iovec walk).
const RAW_SYS_EXIT_CONN: &str = "raw_sys_exit_conn";
const CONN_EXIT_TABLE: &str = "CONN_EXIT";
/// The oldest kernel whose verifier is tried with the full iovec walk: 5.10's and 6.1's give up
/// after a million instructions (minutes under emulation), 6.12's and 6.18's accept it.
const FULL_IOVECS_KERNEL: (u32, u32) = (6, 12);
/// Tracepoints of the data syscalls (their enters) and of every call whose exit [`RAW_SYS_EXIT`]
/// handles, used only when the syscalls are hooked in pairs.
const PAIRED_ONLY: &[&str] = &[
    "sys_enter_read",
    "sys_enter_write",
    "sys_enter_recvfrom",
    "sys_enter_sendto",
    "sys_enter_readv",
    "sys_enter_writev",
    "sys_enter_recvmsg",
    "sys_enter_sendmsg",
    "sys_enter_sendfile64",
    "sys_enter_splice",
    // The exit program reads accept's arguments from the registers; connect keeps its enter.
    "sys_enter_accept",
    "sys_enter_accept4",
    "sys_exit_read",
    "sys_exit_write",
    "sys_exit_recvfrom",
    "sys_exit_sendto",
    "sys_exit_readv",
    "sys_exit_writev",
    "sys_exit_recvmsg",
    "sys_exit_sendmsg",
    "sys_exit_sendfile64",
    "sys_exit_splice",
    "sys_exit_accept",
    "sys_exit_accept4",
    "sys_exit_connect",
];

/// How the data syscalls (read, write and the rest) are hooked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyscallHooks {
    /// One raw tracepoint on every syscall's exit reads the arguments from the saved registers:
    /// one program run per call, and calls already blocked when sonde attached are seen.
    #[default]
    ExitOnly,
    /// The enter and exit tracepoints of each syscall, the arguments kept in between (the design
    /// before issue 17; kept so the benchmark can compare the two).
    Paired,
}

impl SyscallHooks {
    /// Whether program `name` (a syscall hook) belongs to this design.
    fn uses(self, name: &str) -> bool {
        match self {
            Self::ExitOnly => !PAIRED_ONLY.contains(&name),
            Self::Paired => name != RAW_SYS_EXIT,
        }
    }
}

static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sonde-probes"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this sonde binary was built without its eBPF programs (AYA_BUILD_SKIP was set); rebuild with `cargo build --release`"
    )]
    NoPrograms,
    #[error("{0}")]
    Tracefs(String),
    #[error(
        "loading the eBPF programs failed: {0}. sonde needs root or CAP_BPF + CAP_PERFMON (and CAP_SYS_ADMIN on kernels before 5.8); run `sonde check` for details"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF map {name} is missing or has the wrong type: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("loading eBPF program {program} failed: {detail}")]
    ProgramLoad { program: String, detail: String },
    #[error("attaching {program} to tracepoint {category}/{name} failed: {detail}")]
    Attach { program: String, category: &'static str, name: String, detail: String },
    #[error("updating eBPF map {name}: {detail}")]
    Update { name: &'static str, detail: String },
    #[error("traceparent injection (propagation.inject_http) cannot start: {detail}")]
    Inject { detail: String },
}

/// Tunables of the kernel side.
#[derive(Clone, Copy, Debug)]
pub struct CaptureOptions {
    /// Bytes copied per syscall (capped at MAX_CAPTURE).
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Wake the reader once this many bytes are waiting.
    pub wakeup_bytes: u32,
    /// Traceparent injection into outgoing HTTP/1.x requests, with the sampler's bound for the
    /// traces it starts (see `Settings::sample_bound`).
    pub inject_http: Option<u64>,
    /// Benchmark floor: attach programs that only return at every hook point instead of sonde's.
    pub floor: bool,
    pub syscall_hooks: SyscallHooks,
    /// Bytes copied per log write; 0: log capture off.
    pub log_capture_bytes: u32,
    /// Report files opened write-only (log files may be among them).
    pub log_watch_opens: bool,
}

/// Sum over CPUs of the kernel's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ringbuf_drops: u64,
    pub data_events: u64,
    pub bytes_captured: u64,
    pub missed_enters: u64,
    pub tls_events: u64,
    pub tls_no_fd: u64,
    pub log_drops: u64,
    pub log_events: u64,
}

pub struct Capture {
    // Owns the programs (and so their attachments).
    ebpf: Ebpf,
    traced: HashMap<MapData, u32, u32>,
    traced_bits: TracedBits,
    sockets: HashMap<MapData, SocketKey, SocketInfo>,
    log_fds: HashMap<MapData, SocketKey, LogFd>,
    socket_history: HashMap<MapData, SocketKey, SocketHistory>,
    counters: PerCpuArray<MapData, u64>,
    ring: Option<RingBuf<MapData>>,
    usage: MapUsage,
    pub attached: usize,
    /// iovecs the exit program reads per readv/writev/recvmsg/sendmsg call on this kernel.
    pub iovecs_per_call: u32,
    /// Present when traceparent injection is on.
    pub injection: Option<Injection>,
    /// Empty programs at sonde's hook points (see [`CaptureOptions::floor`]).
    floor: bool,
    /// Kept open for the programs' lifetime.
    _settings: Array<MapData, Settings>,
    /// Kept open while the exit program runs: the kernel empties a program array when the last
    /// file descriptor user space holds on it closes.
    _conn_exit: Option<ProgramArray<MapData>>,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |e| CaptureError::Map { name, detail: e.to_string() }
}

impl Capture {
    pub fn load(opts: CaptureOptions) -> Result<Self, CaptureError> {
        if PROBES.is_empty() {
            return Err(CaptureError::NoPrograms);
        }
        tracefs::ensure_mounted().map_err(CaptureError::Tracefs)?;
        raise_memlock();
        raise_open_files();
        let new_task_field =
            |field| tracefs::field_offset("task", "task_newtask", field).map_err(CaptureError::Tracefs);
        let (new_task_pid_offset, new_task_clone_flags_offset) =
            (new_task_field("pid")?, new_task_field("clone_flags")?);
        let sock_field =
            |field| tracefs::field_offset("sock", "inet_sock_set_state", field).map_err(CaptureError::Tracefs);

        // Without injection there is no sock hash (creating one needs CAP_NET_ADMIN).
        let object = match opts.inject_http {
            Some(_) => std::borrow::Cow::Borrowed(PROBES),
            None => super::map_types::without_sock_hash(PROBES, "INJECT_SOCKS")
                .map_err(|detail| CaptureError::Map { name: "INJECT_SOCKS", detail })?,
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", opts.ring_buffer_bytes)
            .map_max_entries("TRACED_BITS", traced_bits::words_for_host())
            .load(&object)
            .map_err(|e| match e {
                aya::EbpfError::MapError(m) if opts.inject_http.is_some() && m.to_string().contains("INJECT_SOCKS") => {
                    CaptureError::Inject { detail: format!("{m}: a sock hash needs CAP_NET_ADMIN") }
                }
                e => CaptureError::Load(e),
            })?;

        let usage = MapUsage::new(&ebpf);
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Map { name, detail: "not in the object file".into() })
        };
        let mut settings: Array<MapData, Settings> =
            Array::try_from(take(&mut ebpf, "SETTINGS")?).map_err(map_err("SETTINGS"))?;
        settings
            .set(
                0,
                Settings {
                    capture_bytes: opts.capture_bytes.min(MAX_CAPTURE as u32),
                    new_task_pid_offset,
                    new_task_clone_flags_offset,
                    log_capture_bytes: opts.log_capture_bytes.min(MAX_CAPTURE as u32),
                    self_pid: std::process::id(),
                    wakeup_bytes: opts.wakeup_bytes,
                    sock_skaddr_offset: sock_field("skaddr")?,
                    sock_oldstate_offset: sock_field("oldstate")?,
                    sock_newstate_offset: sock_field("newstate")?,
                    sock_sport_offset: sock_field("sport")?,
                    sock_family_offset: sock_field("family")?,
                    sock_protocol_offset: sock_field("protocol")?,
                    sock_saddr_offset: sock_field("saddr")?,
                    sock_saddr_v6_offset: sock_field("saddr_v6")?,
                    sock_dport_offset: sock_field("dport")?,
                    sock_daddr_offset: sock_field("daddr")?,
                    sock_daddr_v6_offset: sock_field("daddr_v6")?,
                    inject_http: opts.inject_http.is_some() as u32,
                    sample_bound: opts.inject_http.unwrap_or(0),
                    log_watch_opens: opts.log_watch_opens as u32,
                    // Half the ring: socket payloads always have the other half.
                    log_ring_limit: opts.ring_buffer_bytes / 2,
                },
                0,
            )
            .map_err(|e| CaptureError::Update { name: "SETTINGS", detail: e.to_string() })?;
        let traced = HashMap::try_from(take(&mut ebpf, "TRACED_PIDS")?).map_err(map_err("TRACED_PIDS"))?;
        let traced_bits = match take(&mut ebpf, "TRACED_BITS")? {
            aya::maps::Map::Array(data) => TracedBits::map(data)
                .map_err(|e| CaptureError::Map { name: "TRACED_BITS", detail: format!("mmap: {e}") })?,
            _ => return Err(CaptureError::Map { name: "TRACED_BITS", detail: "not an array".into() }),
        };
        let sockets = HashMap::try_from(take(&mut ebpf, "SOCKETS")?).map_err(map_err("SOCKETS"))?;
        let log_fds = HashMap::try_from(take(&mut ebpf, "LOG_FDS")?).map_err(map_err("LOG_FDS"))?;
        let socket_history =
            HashMap::try_from(take(&mut ebpf, "SOCKET_HISTORY")?).map_err(map_err("SOCKET_HISTORY"))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?).map_err(map_err("COUNTERS"))?;
        let ring = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(map_err("EVENTS"))?;

        let mut attached = 0;
        let mut conn_exit = None;
        let mut iovecs_per_call = sonde_common::MAX_IOVECS;
        let names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_owned()).collect();
        for name in &names {
            let name = name.as_str();
            if INJECT_PROGRAMS.contains(&name)
                || FLOOR_PROGRAMS.contains(&name)
                || name == RAW_SYS_EXIT_COMPACT
                || name == RAW_SYS_EXIT_CONN
                || !opts.syscall_hooks.uses(name)
            {
                continue;
            }
            if name == RAW_SYS_EXIT {
                // Old verifiers give up on the full iovec walk only after a million
                // instructions: older kernels get the compact program at once; the others try
                // the full one first.
                let compact_first = crate::check::running_kernel().is_some_and(|v| v < FULL_IOVECS_KERNEL);
                let loaded = match (opts.floor, compact_first) {
                    (true, _) => FLOOR_RAW_TRACEPOINT,
                    (false, true) => {
                        iovecs_per_call = sonde_common::COMPACT_IOVECS;
                        RAW_SYS_EXIT_COMPACT
                    }
                    (false, false) => name,
                };
                if !opts.floor {
                    conn_exit = Some(load_conn_exit(&mut ebpf)?);
                }
                if let Err(e) = attach_sys_exit(&mut ebpf, loaded) {
                    if loaded != RAW_SYS_EXIT {
                        return Err(e);
                    }
                    log::warn!(
                        "{e}; using {RAW_SYS_EXIT_COMPACT} ({} iovecs read per call instead of {iovecs_per_call})",
                        sonde_common::COMPACT_IOVECS
                    );
                    attach_sys_exit(&mut ebpf, RAW_SYS_EXIT_COMPACT)?;
                    iovecs_per_call = sonde_common::COMPACT_IOVECS;
                }
                attached += 1;
                continue;
            }
            let category = if name.starts_with("sys_") {
                "syscalls"
            } else if name.starts_with("sched_") {
                "sched"
            } else if name.starts_with("task_") {
                "task"
            } else if name.starts_with("inet_sock_") {
                "sock"
            } else {
                // TLS uprobes: loaded now, attached per library file as processes are found.
                let loaded = if opts.floor { name_of_floor_uprobe(name) } else { name };
                let probe: &mut UProbe =
                    program_mut(&mut ebpf, loaded)?.try_into().map_err(|e: aya::programs::ProgramError| {
                        CaptureError::Attach {
                            program: loaded.to_owned(),
                            category: "uprobe",
                            name: name.to_owned(),
                            detail: e.to_string(),
                        }
                    })?;
                if probe.fd().is_err() {
                    probe.load().map_err(|e| load_err(loaded, &e))?;
                }
                continue;
            };
            // The floor arm attaches its empty program at the same tracepoint.
            let loaded = if opts.floor { FLOOR_TRACEPOINT } else { name };
            let attach_err = |detail: String| CaptureError::Attach {
                program: loaded.to_owned(),
                category,
                name: name.to_owned(),
                detail,
            };
            let tp: &mut TracePoint = program_mut(&mut ebpf, loaded)?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
            if tp.fd().is_err() {
                tp.load().map_err(|e| load_err(loaded, &e))?;
            }
            tp.attach(category, name).map_err(|e| attach_err(e.to_string()))?;
            attached += 1;
        }
        let injection = match opts.inject_http {
            Some(_) => Some(Injection::load(&mut ebpf, true)?),
            None => None,
        };
        Ok(Self {
            ebpf,
            traced,
            traced_bits,
            sockets,
            log_fds,
            socket_history,
            counters,
            ring: Some(ring),
            usage,
            attached,
            iovecs_per_call,
            injection,
            floor: opts.floor,
            _settings: settings,
            _conn_exit: conn_exit,
        })
    }

    /// Attaches the TLS uprobes to one file that has OpenSSL's SSL_* symbols (a libssl, or an
    /// executable that links OpenSSL statically), for one process or for every process that maps
    /// it. Symbols the file lacks are skipped; an error means not even SSL_read/SSL_read_ex could
    /// be attached (and nothing stays attached).
    pub fn attach_tls(&mut self, path: &std::path::Path, scope: TlsScope) -> Result<TlsLinks, TlsAttachError> {
        let uprobe_scope = match scope {
            TlsScope::AllProcesses => UProbeScope::AllProcesses,
            TlsScope::Process(pid) => match NonZeroU32::new(pid) {
                Some(pid) => UProbeScope::OneProcess(pid),
                None => return Err(TlsAttachError::Failed("pid 0".into())),
            },
        };
        let mut links = TlsLinks { links: Vec::new(), symbols: Vec::new() };
        let mut last_error = String::new();
        let mut only_missing_symbols = true;
        for (symbol, program) in TLS_ATTACHMENTS {
            let program: &'static str = if self.floor { name_of_floor_uprobe(program) } else { program };
            let probe = match self.uprobe(program) {
                Ok(probe) => probe,
                Err(e) => {
                    self.detach_tls(links);
                    return Err(TlsAttachError::Failed(e));
                }
            };
            match probe.attach(*symbol, path, uprobe_scope) {
                Ok(id) => {
                    links.links.push((program, id));
                    if !links.symbols.contains(symbol) {
                        links.symbols.push(*symbol);
                    }
                }
                Err(e) => {
                    only_missing_symbols &= matches!(
                        e,
                        aya::programs::ProgramError::UProbeError(aya::programs::UProbeError::SymbolError { .. })
                    );
                    last_error = format!("{symbol}: {e}");
                }
            }
        }
        if links.symbols.iter().any(|s| *s == "SSL_read" || *s == "SSL_read_ex") {
            return Ok(links);
        }
        self.detach_tls(links);
        Err(if only_missing_symbols { TlsAttachError::NoOpenSsl } else { TlsAttachError::Failed(last_error) })
    }

    /// Detaches what one [`Capture::attach_tls`] attached.
    pub fn detach_tls(&mut self, links: TlsLinks) {
        for (program, id) in links.links {
            if let Ok(probe) = self.uprobe(program) {
                let _ = probe.detach(id);
            }
        }
    }

    fn uprobe(&mut self, program: &str) -> Result<&mut UProbe, String> {
        let Some(prog) = self.ebpf.program_mut(program) else { return Err(format!("program {program} missing")) };
        prog.try_into().map_err(|e: aya::programs::ProgramError| e.to_string())
    }

    /// The ring buffer, handed to the reader once.
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    pub fn trace_pid(&mut self, pid: u32) -> Result<(), CaptureError> {
        // The hash holds every traced pid (for the agent, and for pids beyond the bitmap);
        // the bitmap is what the kernel reads.
        self.traced
            .insert(pid, TRACED_FLAG_TRACED, 0)
            .map_err(|e| CaptureError::Update { name: "TRACED_PIDS", detail: e.to_string() })?;
        self.traced_bits.set(pid);
        Ok(())
    }

    pub fn untrace_pid(&mut self, pid: u32) {
        let _ = self.traced.remove(&pid);
        self.traced_bits.clear(pid);
    }

    pub fn is_traced(&self, pid: u32) -> bool {
        self.traced.get(&pid, 0).is_ok()
    }

    pub fn traced_count(&self) -> usize {
        self.traced.keys().filter(Result::is_ok).count()
    }

    /// Marks an fd as a socket to capture (sockets that existed before sonde saw them).
    pub fn track_socket(&mut self, pid: u32, fd: u32, role: Role) -> Result<(), CaptureError> {
        let role = match role {
            Role::Server => ROLE_SERVER,
            Role::Client => ROLE_CLIENT,
            Role::Unknown => 0,
        };
        self.sockets
            .insert(SocketKey { pid, fd }, SocketInfo { role, flags: 0, opened_ns: 0, closed_ns: 0 }, 0)
            .map_err(|e| CaptureError::Update { name: "SOCKETS", detail: e.to_string() })
    }

    /// Marks `fd` of `pid` as a log fd (`LOG_STREAM_*`).
    pub fn set_log_fd(&mut self, pid: u32, fd: u32, stream: u32) -> Result<(), CaptureError> {
        self.log_fds
            .insert(SocketKey { pid, fd }, LogFd { stream, _pad: 0 }, 0)
            .map_err(|e| CaptureError::Update { name: "LOG_FDS", detail: e.to_string() })
    }

    /// `fd` of `pid` is not a log fd (a file opened for writing that matched no `logs.files`).
    pub fn forget_log_fd(&mut self, pid: u32, fd: u32) {
        let _ = self.log_fds.remove(&SocketKey { pid, fd });
    }

    /// Removes an exited process's log fds.
    pub fn forget_log_fds_of(&mut self, pid: u32) {
        let keys: Vec<SocketKey> = self.log_fds.keys().filter_map(Result::ok).filter(|k| k.pid == pid).collect();
        for key in keys {
            let _ = self.log_fds.remove(&key);
        }
    }

    /// Removes what the kernel keeps for an exited process's sockets: its socket map entries
    /// (closed ones stay as tombstones while it has children) and its socket history.
    pub fn forget_sockets_of(&mut self, pid: u32) {
        let sockets: Vec<SocketKey> = self.sockets.keys().filter_map(Result::ok).filter(|k| k.pid == pid).collect();
        for key in sockets {
            let _ = self.sockets.remove(&key);
        }
        let history: Vec<SocketKey> =
            self.socket_history.keys().filter_map(Result::ok).filter(|k| k.pid == pid).collect();
        for key in history {
            let _ = self.socket_history.remove(&key);
        }
    }

    /// Entries in each per-process/per-connection map (walks every key: call it seldom).
    pub fn map_fill(&self) -> Vec<MapFill> {
        let mut fill = self.usage.fill();
        fill.push(MapFill {
            name: "traced_bits",
            entries: self.traced_bits.count(),
            capacity: self.traced_bits.capacity(),
        });
        fill
    }

    /// `sonde check`: whether traceparent injection could run here (its programs load, cgroup v2
    /// is there, FIONREAD behaves), without attaching anything. Only when injection is off.
    pub fn check_injection(&mut self) -> Result<std::path::PathBuf, CaptureError> {
        // A second copy of the object, with its sock hash: this one's was made a plain hash.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", 1 << 16)
            .map_max_entries("TRACED_BITS", traced_bits::words_for_host())
            .load(PROBES)
            .map_err(|e| CaptureError::Inject {
                detail: format!("{e} (a sock hash needs CAP_NET_ADMIN, which injection needs anyway)"),
            })?;
        Injection::load(&mut ebpf, false).map(|i| i.cgroup)
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |index: u32| -> u64 { self.counters.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0) };
        debug_assert_eq!(COUNT, 8);
        KernelCounters {
            ringbuf_drops: sum(counter::RINGBUF_DROPS),
            data_events: sum(counter::DATA_EVENTS),
            bytes_captured: sum(counter::BYTES_CAPTURED),
            missed_enters: sum(counter::MISSED_ENTERS),
            tls_events: sum(counter::TLS_EVENTS),
            tls_no_fd: sum(counter::TLS_NO_FD),
            log_drops: sum(counter::LOG_DROPS),
            log_events: sum(counter::LOG_EVENTS),
        }
    }
}

/// Loads `program` and attaches it to the raw tracepoint on every syscall's exit.
fn attach_sys_exit(ebpf: &mut Ebpf, program: &str) -> Result<(), CaptureError> {
    let attach_err = |detail: String| CaptureError::Attach {
        program: program.to_owned(),
        category: "raw_syscalls",
        name: "sys_exit".to_owned(),
        detail,
    };
    let tp: &mut RawTracePoint =
        program_mut(ebpf, program)?.try_into().map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
    tp.load().map_err(|e| load_err(program, &e))?;
    tp.attach("sys_exit").map_err(|e| attach_err(e.to_string()))?;
    Ok(())
}

/// Loads [`RAW_SYS_EXIT_CONN`] and puts it where the exit program tail-calls it.
fn load_conn_exit(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>, CaptureError> {
    let map = ebpf
        .take_map(CONN_EXIT_TABLE)
        .ok_or(CaptureError::Map { name: CONN_EXIT_TABLE, detail: "not in the object file".into() })?;
    let mut table = ProgramArray::try_from(map).map_err(map_err(CONN_EXIT_TABLE))?;
    let program: &mut RawTracePoint =
        program_mut(ebpf, RAW_SYS_EXIT_CONN)?.try_into().map_err(|e: aya::programs::ProgramError| {
            CaptureError::ProgramLoad { program: RAW_SYS_EXIT_CONN.to_owned(), detail: e.to_string() }
        })?;
    program.load().map_err(|e| load_err(RAW_SYS_EXIT_CONN, &e))?;
    let fd = program.fd().map_err(|e| load_err(RAW_SYS_EXIT_CONN, &e))?;
    table.set(0, fd, 0).map_err(|e| CaptureError::Update { name: CONN_EXIT_TABLE, detail: e.to_string() })?;
    Ok(table)
}

fn load_err(program: &str, error: &aya::programs::ProgramError) -> CaptureError {
    CaptureError::ProgramLoad { program: program.to_owned(), detail: verifier_log::describe_load_error(program, error) }
}

/// Every uprobe attached to one process is a perf event file descriptor (ten per process with
/// OpenSSL): raise the soft limit on open files to the hard limit (commonly 1024 -> 524288).
fn raise_open_files() {
    let mut rlim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) == 0 && rlim.rlim_cur < rlim.rlim_max {
            rlim.rlim_cur = rlim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &rlim);
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg. Try to raise
/// it and ignore failure (not permitted without CAP_SYS_RESOURCE, and not needed on new kernels).
fn raise_memlock() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}
