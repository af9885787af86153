//! TLS plaintext at the OpenSSL boundary: uprobes on SSL_read/SSL_write (+ `_ex`) and
//! SSL_do_handshake. The plaintext is tied to its socket without reading any OpenSSL struct:
//! the fd of a socket syscall the same thread makes inside the call (socket BIOs: libssl users
//! like nginx, curl, Python, PostgreSQL), else the socket the thread last read from (memory BIOs:
//! Node.js reads ciphertext with libuv right before SSL_read). The mapping is kept per SSL object.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use sonde_common::{DATA_FLAG_TLS, MAX_INFLIGHT, SOCKET_FLAG_TLS, SocketKey, TRACED_FLAG_TLS, counter};

use crate::{
    data::{emit_data, socket_info},
    maps::{
        Call, Inflight, LAST_READ_FD, SOCKETS, TRACED_PIDS, count, traced_current, traced_current_flags, write_slot,
    },
};

/// A slot whose call has returned.
const KIND_NONE: u32 = 0;
const KIND_READ: u32 = 1;
const KIND_WRITE: u32 = 2;
/// Sessions whose socket is remembered.
const MAX_SESSIONS: u32 = 65536;

/// An SSL_read/SSL_write call in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    ssl: u64,
    buf: u64,
    /// `size_t *readbytes` / `*written` of the `_ex` variants; 0 for the plain ones.
    len_ptr: u64,
    kind: u32,
    /// Socket seen by a syscall inside the call, or u32::MAX.
    fd: u32,
}

/// A handshake in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HandshakeCall {
    ssl: u64,
    fd: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionKey {
    tgid: u32,
    _pad: u32,
    ssl: u64,
}

/// pid_tgid -> the thread's SSL_read/SSL_write in progress. One slot per thread that calls into
/// OpenSSL, rewritten in place (`kind` 0 once the call returned) instead of inserted and deleted
/// per call; `sched_process_exit` drops it.
#[map]
pub static TLS_CALLS: HashMap<u64, TlsCall> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

#[map]
static HANDSHAKES: LruHashMap<u64, HandshakeCall> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

/// (process, SSL object) -> socket fd.
#[map]
static SESSIONS: LruHashMap<SessionKey, u32> = LruHashMap::with_max_entries(MAX_SESSIONS, 0);

/// Called by the data syscall hooks: true when this thread is inside a TLS call (the bytes are
/// ciphertext). Records which socket the call uses.
#[inline(always)]
pub fn note_inner_syscall(tgid: u32, pid_tgid: u64, fd: u32) -> bool {
    let mut inside = false;
    if let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) {
        // SAFETY: per-thread record, only this thread writes it.
        let call = unsafe { &mut *call };
        if call.kind != KIND_NONE {
            // SSL_read usually reads twice (a record, then EAGAIN): bind once per call.
            if call.fd != fd {
                call.fd = fd;
                remember(tgid, call.ssl, fd);
            }
            inside = true;
        }
    }
    if let Some(hs) = HANDSHAKES.get_ptr_mut(&pid_tgid) {
        // SAFETY: as above.
        let hs = unsafe { &mut *hs };
        hs.fd = fd;
        remember(tgid, hs.ssl, fd);
        inside = true;
    }
    inside
}

/// Maps an SSL object to its socket and marks the socket as TLS. Written only when it changes:
/// an LRU update costs several lookups.
#[inline(always)]
fn remember(tgid: u32, ssl: u64, fd: u32) {
    let session = SessionKey { tgid, _pad: 0, ssl };
    // SAFETY: value copied out.
    if unsafe { SESSIONS.get(&session) }.copied() != Some(fd) {
        let _ = SESSIONS.insert(&session, &fd, 0);
    }
    let key = SocketKey { pid: tgid, fd };
    if let Some(info) = SOCKETS.get_ptr_mut(&key) {
        // SAFETY: a flag bit set in place; concurrent writers only ever set it too.
        unsafe {
            if (*info).flags & SOCKET_FLAG_TLS == 0 {
                (*info).flags |= SOCKET_FLAG_TLS;
            }
        }
    }
}

#[inline(always)]
fn session_fd(tgid: u32, ssl: u64) -> Option<u32> {
    // SAFETY: value copied out.
    unsafe { SESSIONS.get(&SessionKey { tgid, _pad: 0, ssl }) }.copied()
}

/// Entry of any SSL_* call of a traced thread: its pid_tgid. The first call marks the process as
/// using TLS (`TRACED_FLAG_TLS`), so its socket syscalls start looking for TLS calls around them.
#[inline(always)]
fn traced_tls_call() -> Option<u64> {
    let (tgid, _, pid_tgid, flags) = traced_current_flags()?;
    if flags & TRACED_FLAG_TLS == 0 {
        crate::maps::set_traced_flags(tgid, flags | TRACED_FLAG_TLS);
        // Pids beyond the bitmap keep their flags in the hash only.
        if let Some(flags) = TRACED_PIDS.get_ptr_mut(&tgid) {
            // SAFETY: a bit set in place; every writer only ever sets bits.
            unsafe { *flags |= TRACED_FLAG_TLS };
        }
    }
    Some(pid_tgid)
}

#[inline(always)]
fn enter(ctx: &ProbeContext, kind: u32, ex: bool) -> u32 {
    let Some(pid_tgid) = traced_tls_call() else { return 0 };
    let call = TlsCall {
        ssl: ctx.arg::<u64>(0).unwrap_or(0),
        buf: ctx.arg::<u64>(1).unwrap_or(0),
        len_ptr: if ex { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 },
        kind,
        fd: u32::MAX,
    };
    write_slot(&TLS_CALLS, pid_tgid, &call);
    0
}

#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_READ, false)
}

#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_READ, true)
}

#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_WRITE, false)
}

#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_WRITE, true)
}

/// Return of any of the four: emit the plaintext that moved.
#[uretprobe]
pub fn ssl_rw_exit(ctx: RetProbeContext) -> u32 {
    // Only threads of traced processes have a slot: the lookup is the PID filter.
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = TLS_CALLS.get_ptr_mut(&pid_tgid) else { return 0 };
    // SAFETY: this thread's slot, copied out, then marked returned.
    let call = unsafe { *slot };
    if call.kind == KIND_NONE {
        return 0;
    }
    unsafe { (*slot).kind = KIND_NONE };
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SSL_read/SSL_write and the _ex variants return C int: only the low 32 bits are defined.
    let ret = ctx.ret::<i32>() as i64;
    // A plain u32 with u32::MAX for "unknown", not an Option: LLVM leaves the payload of a None
    // undefined, and the verifier rejects any copy of an uninitialized register.
    let mut fd = if call.fd != u32::MAX { call.fd } else { session_fd(tgid, call.ssl).unwrap_or(u32::MAX) };
    if fd == u32::MAX {
        // Memory-BIO stacks (Node.js) read the ciphertext just before SSL_read, and drive the
        // handshake through SSL_read or even SSL_write calls (a write issued during the
        // handshake completes it with the server's flight it was just fed): an unbound session
        // belongs to the socket this thread last read.
        // SAFETY: value copied out.
        fd = unsafe { LAST_READ_FD.get(&pid_tgid) }.copied().unwrap_or(u32::MAX);
        if fd != u32::MAX {
            remember(tgid, call.ssl, fd);
        }
    }
    let moved = if call.len_ptr != 0 {
        if ret != 1 {
            return 0;
        }
        // SAFETY: user pointer, fault-tolerant read.
        unsafe { bpf_probe_read_user(call.len_ptr as *const u64) }.unwrap_or(0)
    } else if ret > 0 {
        ret as u64
    } else {
        return 0;
    };
    if moved == 0 {
        return 0;
    }
    if fd == u32::MAX {
        count(counter::TLS_NO_FD, 1);
        return 0;
    }
    let role = socket_info(tgid, fd).map(|i| i.role).unwrap_or(0);
    let rec = Inflight {
        call: if call.kind == KIND_READ { Call::ReadBuf } else { Call::WriteBuf },
        fd,
        ptr: call.buf,
        len: 0,
        role,
        _pad: 0,
    };
    // TLS plaintext is one buffer: the iovec bound does not matter here.
    emit_data::<{ sonde_common::COMPACT_IOVECS }>(tgid, tid, &rec, moved, DATA_FLAG_TLS);
    0
}

#[uprobe]
pub fn ssl_handshake_enter(ctx: ProbeContext) -> u32 {
    let Some(pid_tgid) = traced_tls_call() else { return 0 };
    let call = HandshakeCall { ssl: ctx.arg::<u64>(0).unwrap_or(0), fd: u32::MAX, _pad: 0 };
    let _ = HANDSHAKES.insert(&pid_tgid, &call, 0);
    0
}

/// A finished handshake (re)binds the SSL object to its socket: SSL objects are reused.
#[uretprobe]
pub fn ssl_handshake_exit(ctx: RetProbeContext) -> u32 {
    let Some((tgid, _, pid_tgid)) = traced_current() else { return 0 };
    // SAFETY: value copied out before removal.
    let Some(hs) = (unsafe { HANDSHAKES.get(&pid_tgid) }).copied() else { return 0 };
    let _ = HANDSHAKES.remove(&pid_tgid);
    if ctx.ret::<i32>() != 1 || hs.fd != u32::MAX {
        return 0;
    }
    // No syscall inside the handshake: a memory-BIO stack; the last socket read is the peer's.
    // SAFETY: value copied out.
    if let Some(fd) = unsafe { LAST_READ_FD.get(&pid_tgid) }.copied() {
        remember(tgid, hs.ssl, fd);
    }
    0
}
