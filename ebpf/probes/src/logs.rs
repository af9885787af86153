//! Log writes (`logs.capture`): what traced processes write to their stdout, stderr and log
//! files, through the same write hooks as socket payloads. An fd is a log fd only when
//! `LOG_FDS` says so: user space lists fds 1 and 2 and the files matching `logs.files` when it
//! starts tracing a process, a child inherits its parent's entries, and a file opened for
//! writing later is reported (`LogOpen`) so user space can classify it. Sockets never get here.
//! With log capture off, all of this is one settings read on a non-socket write.

use aya_ebpf::{
    helpers::generated::bpf_probe_read_user_str as probe_read_user_str_raw, macros::map, maps::LruHashMap,
};
use sonde_common::{
    ConnEvent, EventKind, LOG_STREAM_PENDING, LogFd, MAX_LOG_FDS, MAX_LOG_PATH, RawSockaddr, SocketKey, counter,
};

use crate::maps::{Call, DataScratch, Inflight, PARENTS, SCRATCH, count, header, output_scratch, settings, submit};

/// (tgid, fd) -> what the fd is, for the log fds of traced processes.
#[map]
pub static LOG_FDS: LruHashMap<SocketKey, LogFd> = LruHashMap::with_max_entries(MAX_LOG_FDS, 0);

/// Set in [`Inflight::role`] for a log write; the low byte is the `LOG_STREAM_*`.
pub const LOG_ROLE: u32 = 0x100;

const O_ACCMODE: u64 = 3;
const O_WRONLY: u64 = 1;
/// creat(path, mode) is open(path, O_WRONLY | O_CREAT | O_TRUNC, mode).
pub const CREAT_FLAGS: u64 = 0o1101;

#[inline(always)]
fn logs_on() -> bool {
    settings().is_some_and(|s| s.log_capture_bytes != 0)
}

/// The log stream of `fd`, or None when it is not a log fd. A child finds the entries its parent
/// had and keeps a copy.
#[inline(always)]
fn log_stream(tgid: u32, fd: u32) -> Option<u32> {
    let key = SocketKey { pid: tgid, fd };
    // SAFETY: read-only lookups; values are copied out.
    if let Some(entry) = unsafe { LOG_FDS.get(&key) } {
        return Some(entry.stream);
    }
    let parent = unsafe { PARENTS.get(&tgid) }?.parent;
    let inherited = *unsafe { LOG_FDS.get(&SocketKey { pid: parent, fd }) }?;
    let _ = LOG_FDS.insert(&key, &inherited, 0);
    Some(inherited.stream)
}

/// A write-family call on `fd`, which is not a tracked socket: the record to emit when `fd` is
/// a log fd.
#[inline(always)]
pub fn log_call(tgid: u32, call: Call, fd: u32, ptr: u64, len: u64) -> Option<Inflight> {
    if !matches!(call, Call::WriteBuf | Call::WriteVec) || !logs_on() {
        return None;
    }
    let stream = log_stream(tgid, fd)?;
    Some(Inflight { call, fd, ptr, len, role: LOG_ROLE | stream, _pad: 0 })
}

/// open/openat/creat returned `fd`: a file opened write-only may be a log file. Its writes are
/// sent as pending until user space has classified it from this report.
#[inline(always)]
pub fn on_open(tgid: u32, tid: u32, ret: i64, path: u64, flags: u64) {
    if ret < 0 || flags & O_ACCMODE != O_WRONLY || !settings().is_some_and(|s| s.log_watch_opens != 0 && s.log_capture_bytes != 0)
    {
        return;
    }
    let fd = ret as u32;
    let _ = LOG_FDS.insert(&SocketKey { pid: tgid, fd }, &LogFd { stream: LOG_STREAM_PENDING, _pad: 0 }, 0);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch, exclusively ours while this program runs.
    let scratch: &mut DataScratch = unsafe { &mut *scratch };
    // SAFETY: the destination is the scratch payload (longer than MAX_LOG_PATH); the helper
    // tolerates faults on the user pointer. It returns the length with the NUL.
    let rc = unsafe {
        probe_read_user_str_raw(scratch.payload.as_mut_ptr().cast(), MAX_LOG_PATH, path as *const core::ffi::c_void)
    };
    let len = if rc > 1 { (rc - 1) as u64 } else { 0 };
    scratch.event.header = header(EventKind::LogOpen, tgid, tid);
    scratch.event.fd = fd;
    scratch.event.direction = 0;
    scratch.event.byte_count = len;
    scratch.event.captured_len = len as u32;
    scratch.event.flags = flags as u32;
    scratch.event.role = 0;
    let size = (size_of::<sonde_common::DataEvent>() as u64) + (len & (2 * MAX_LOG_PATH as u64 - 1));
    let rc = output_scratch(scratch, size);
    if rc < 0 {
        // Its writes then arrive with no classification and are dropped as unknown.
        count(counter::LOG_DROPS, 1);
    }
}

/// close(fd) of a traced process: true when `fd` was a log fd (its entry goes, and user space
/// hears of it to flush the writer's last partial line).
#[inline(always)]
pub fn on_close(tgid: u32, tid: u32, fd: u32) -> bool {
    if !logs_on() {
        return false;
    }
    let key = SocketKey { pid: tgid, fd };
    if LOG_FDS.remove(&key).is_err() {
        return false;
    }
    submit(&ConnEvent {
        header: header(EventKind::ConnClose, tgid, tid),
        fd,
        role: 0,
        listen_fd: u32::MAX,
        _pad: 0,
        peer: RawSockaddr::EMPTY,
        local: RawSockaddr::EMPTY,
    });
    true
}
