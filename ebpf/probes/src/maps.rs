//! Maps shared by all hooks, and the small helpers every hook uses.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use sonde_common::{
    EventHeader, MAX_INFLIGHT, MAX_SOCKETS, MAX_TRACED_PIDS, ParentInfo, SCRATCH_PAYLOAD, Settings, SocketInfo,
    SocketKey, counter,
};

/// tgid -> flags. Filled by discovery and by the fork hook. The PID filter.
#[map]
pub static TRACED_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TRACED_PIDS, 0);

/// One byte per tgid, the PID filter: `TRACED_FLAG_TRACED` and `TRACED_FLAG_TLS` (pid `p` is byte
/// `p % 8` of word `p / 8`). Every hook runs for every process on the host: reading this array is
/// inlined by the verifier, where a hash lookup is a call, and traced processes need no lookup at
/// all to learn their flags. Set by the agent (which sizes it from pid_max and mmaps it,
/// BPF_F_MMAPABLE) and by the fork hook, cleared at exit. A byte per pid, not two bits: each
/// writer stores only its own pid's byte, so no atomic OR/AND is needed (kernels before 5.12 lack
/// them) and a write can never erase a neighbouring pid's flags.
#[map]
pub static TRACED_BITS: Array<u64> = Array::with_max_entries(1, sonde_common::BPF_F_MMAPABLE);

/// Where a tgid's flags sit in TRACED_BITS: (word, byte in the word).
#[inline(always)]
fn flag_slot(tgid: u32) -> (u32, u32) {
    (tgid / 8, tgid % 8)
}

/// The process's `TRACED_FLAG_*` bits (0: not traced). Pids beyond the bitmap (pid_max raised
/// after the agent started) are looked up in TRACED_PIDS.
#[inline(always)]
pub fn traced_flags(tgid: u32) -> u32 {
    let (index, byte) = flag_slot(tgid);
    match TRACED_BITS.get(index) {
        Some(word) => ((*word >> (8 * byte)) & 3) as u32,
        // SAFETY: read-only lookup; the value is copied out.
        None => unsafe { TRACED_PIDS.get(&tgid) }.copied().unwrap_or(0),
    }
}

/// Writes the process's flag byte (`TRACED_FLAG_*` bits).
#[inline(always)]
pub fn set_traced_flags(tgid: u32, flags: u32) {
    let (index, byte) = flag_slot(tgid);
    if let Some(word) = TRACED_BITS.get_ptr_mut(index) {
        // SAFETY: byte `byte` (< 8) of an 8-byte array value, alive as long as the map. A
        // volatile single-byte store: exactly this pid's byte is written.
        unsafe { core::ptr::write_volatile(word.cast::<u8>().add(byte as usize), (flags & 3) as u8) };
    }
}

/// Clears the process's flags.
#[inline(always)]
pub fn clear_traced_flags(tgid: u32) {
    set_traced_flags(tgid, 0);
}

/// (tgid, fd) -> socket info, for TCP sockets born from accept/connect or seeded from /proc.
#[map]
pub static SOCKETS: LruHashMap<SocketKey, SocketInfo> = LruHashMap::with_max_entries(MAX_SOCKETS, 0);

/// child tgid -> parent tgid, for children forked by traced processes: a child inherits its
/// parent's sockets (fork-after-accept servers), found here on the child's first use of the fd.
#[map]
pub static PARENTS: LruHashMap<u32, ParentInfo> = LruHashMap::with_max_entries(MAX_TRACED_PIDS, 0);

/// tgids of traced processes that have forked: their closed sockets are kept as tombstones.
#[map]
pub static HAS_CHILDREN: LruHashMap<u32, u32> = LruHashMap::with_max_entries(MAX_TRACED_PIDS, 0);

/// Earlier sockets of the same (tgid, fd) of a process with children, newest overwriting oldest.
/// A fork-per-connection server (PostgreSQL) accepts, forks, closes and accepts again on the same
/// fd number, often before the child's first syscall: the child finds its socket here.
#[map]
pub static SOCKET_HISTORY: LruHashMap<SocketKey, SocketHistory> = LruHashMap::with_max_entries(4096, 0);

pub use sonde_common::{HISTORY_DEPTH, SocketHistory};

/// pid_tgid -> arguments saved at syscall enter, consumed at exit (accept and connect; every data
/// syscall too when they are hooked in pairs, see `exit.rs`). One slot per traced thread,
/// rewritten in place and marked `Call::Done` at exit rather than inserted and deleted per call
/// (a lookup costs a fraction of an update or a delete); `sched_process_exit` drops the slot.
#[map]
pub static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// pid_tgid -> the socket fd this thread last read from (for TLS libraries that do their I/O
/// outside SSL_read, like Node.js with memory BIOs). Dropped by `sched_process_exit`.
#[map]
pub static LAST_READ_FD: HashMap<u64, u32> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Every record for user space. Size set by the agent at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Per-CPU counters, indexed by `sonde_common::counter::*`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Runtime settings at index 0, written by the agent before attaching.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per-CPU scratch where a data event is assembled before it is copied to the ring buffer
/// (the BPF stack is only 512 bytes).
#[map]
pub static SCRATCH: PerCpuArray<DataScratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct DataScratch {
    pub event: sonde_common::DataEvent,
    pub payload: [u8; SCRATCH_PAYLOAD],
}

/// Which syscall an [`Inflight`] record belongs to.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// The slot's call has exited (or none was saved).
    Done = 0,
    /// Plain buffer: read, recvfrom.
    ReadBuf = 1,
    /// Plain buffer: write, sendto.
    WriteBuf = 2,
    /// iovec array: readv.
    ReadVec = 3,
    /// iovec array: writev.
    WriteVec = 4,
    /// msghdr: recvmsg.
    ReadMsg = 5,
    /// msghdr: sendmsg.
    WriteMsg = 6,
    /// sendfile/splice towards a socket: count only.
    WriteUncopied = 7,
    /// splice from a socket: count only.
    ReadUncopied = 8,
    Accept = 9,
    Connect = 10,
}

/// Syscall arguments kept between enter and exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inflight {
    pub call: Call,
    pub fd: u32,
    /// Buffer, iovec array, msghdr or sockaddr pointer.
    pub ptr: u64,
    /// iovec count where relevant.
    pub len: u64,
    /// `ROLE_*` of the socket.
    pub role: u32,
    pub _pad: u32,
}

/// Writes a thread's slot in a per-thread map: in place when it exists (a lookup costs a
/// fraction of an update), inserted the first time.
#[inline(always)]
pub fn write_slot<V: Copy>(map: &HashMap<u64, V>, pid_tgid: u64, value: &V) {
    if let Some(slot) = map.get_ptr_mut(&pid_tgid) {
        // SAFETY: the slot is this thread's; only this thread writes it.
        unsafe { *slot = *value };
    } else {
        let _ = map.insert(&pid_tgid, value, 0);
    }
}

/// Saves a call's arguments in the thread's slot.
#[inline(always)]
pub fn save_inflight(pid_tgid: u64, rec: &Inflight) {
    write_slot(&INFLIGHT, pid_tgid, rec);
}

/// Takes the arguments the current thread saved at enter, if a saved call is in progress.
#[inline(always)]
pub fn take_inflight(pid_tgid: u64) -> Option<Inflight> {
    if traced_flags((pid_tgid >> 32) as u32) == 0 {
        return None;
    }
    let slot = INFLIGHT.get_ptr_mut(&pid_tgid)?;
    // SAFETY: as above.
    let rec = unsafe { *slot };
    if rec.call == Call::Done {
        return None;
    }
    unsafe { (*slot).call = Call::Done };
    Some(rec)
}

/// The current thread's (tgid, tid, pid_tgid) and its process's `TRACED_FLAG_*` bits, if traced.
#[inline(always)]
pub fn traced_current_flags() -> Option<(u32, u32, u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let flags = traced_flags(tgid);
    if flags == 0 {
        return None;
    }
    Some((tgid, pid_tgid as u32, pid_tgid, flags))
}

/// The current thread's (tgid, tid, pid_tgid) if its process is traced.
#[inline(always)]
pub fn traced_current() -> Option<(u32, u32, u64)> {
    traced_current_flags().map(|(tgid, tid, pid_tgid, _)| (tgid, tid, pid_tgid))
}

#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

#[inline(always)]
pub fn count(index: u32, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += by };
    }
}

/// Kernel time of the latest record that did not fit in the ring buffer, any CPU (index 0).
/// Every record carries what it read here, so user space learns of a loss before it uses any
/// record made after it: request positions on connections are only trusted while nothing was
/// lost. A plain store is enough (no BPF atomics before 5.12): every loss writes a time no record
/// has carried yet, whichever store lands last.
#[map]
pub static LAST_LOSS: Array<u64> = Array::with_max_entries(1, 0);

/// Counts one lost record.
#[inline(always)]
pub fn count_loss() {
    count(counter::RINGBUF_DROPS, 1);
    if let Some(last) = LAST_LOSS.get_ptr_mut(0) {
        // SAFETY: an 8-byte aligned array value, alive as long as the map; one 8-byte store.
        unsafe { core::ptr::write_volatile(last, aya_ebpf::helpers::bpf_ktime_get_ns()) };
    }
}

#[inline(always)]
pub fn header(kind: sonde_common::EventKind, tgid: u32, tid: u32) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        pid: tgid,
        tid,
        last_loss: LAST_LOSS.get(0).map(|t| *t as u32).unwrap_or(0),
        // SAFETY: helper with no arguments.
        ts_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
    }
}

/// Records this CPU wrote without a wakeup while the unread data was above the threshold.
#[map]
pub static WAKEUP_SKIPPED: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Above the threshold, one record in this many per CPU still forces a wakeup.
const WAKEUP_EVERY: u32 = 64;

/// Ring buffer flags for a record of `size` bytes: wake the reader when this record makes the
/// unread data cross the threshold; below it the reader's own poll interval picks records up.
/// Above it the reader is awake or behind: only every [`WAKEUP_EVERY`]th record per CPU reminds
/// it, because each forced wakeup queues an irq_work (a self-interrupt) inside the traced
/// process's syscall, which under a hypervisor costs microseconds.
#[inline(always)]
pub fn wakeup_flags(size: u64) -> u64 {
    let threshold = settings().map(|s| s.wakeup_bytes).unwrap_or(0) as u64;
    let unread = EVENTS.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64);
    if unread + size < threshold {
        return BPF_RB_NO_WAKEUP as u64;
    }
    if unread < threshold {
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    if let Some(skipped) = WAKEUP_SKIPPED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe {
            *skipped += 1;
            if *skipped >= WAKEUP_EVERY {
                *skipped = 0;
                return BPF_RB_FORCE_WAKEUP as u64;
            }
        }
    }
    BPF_RB_NO_WAKEUP as u64
}

/// Copies a fixed-size record to the ring buffer, counting a drop when it is full.
#[inline(always)]
pub fn submit<T>(record: &T) {
    if EVENTS.output::<T>(record, wakeup_flags(size_of::<T>() as u64)).is_err() {
        count_loss();
    }
}

/// Sends the first `size` bytes of this CPU's scratch record (a data, log or file-open event with
/// its payload); the helper's return code (negative when the ring is full). The caller bounds
/// `size` with a mask the verifier can follow.
#[inline(always)]
pub fn output_scratch(scratch: &mut DataScratch, size: u64) -> i64 {
    // SAFETY: `size` is bounded below the scratch value's size, which the verifier checks.
    unsafe {
        aya_ebpf::helpers::generated::bpf_ringbuf_output(
            core::ptr::addr_of!(EVENTS).cast_mut().cast(),
            core::ptr::from_mut(scratch).cast(),
            size,
            wakeup_flags(size),
        )
    }
}

/// [`submit`] for a record user space must act on at once (a process to start tracing, a
/// library to probe): it wakes the reader whatever is pending, so the agent's poll of an idle
/// ring can be slow without a new process running untraced meanwhile. These are rare.
#[inline(always)]
pub fn submit_now<T>(record: &T) {
    if EVENTS.output::<T>(record, BPF_RB_FORCE_WAKEUP as u64).is_err() {
        count_loss();
    }
}
