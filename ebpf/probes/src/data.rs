//! Data path: what the syscalls that move socket payloads emit, plus accept/connect/close which
//! tell us which fds are sockets and in which role. By default the data syscalls reach this
//! code from their exit alone (`exit.rs`); the per-syscall enter/exit tracepoints below are the
//! paired design the benchmark compares against (`--paired-syscalls`), and still serve
//! accept/connect (enter) and close.
//!
//! Syscall tracepoint records are a stable ABI: arguments are 8-byte slots from offset 16 on
//! enter, and the return value is at offset 16 on exit.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_probe_read_user as probe_read_user_raw},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use sonde_common::{
    ConnEvent, DATA_FLAG_TLS, DATA_FLAG_UNCOPIED, DIR_EGRESS, DIR_INGRESS, EventKind, MAX_CAPTURE, MAX_INFLIGHT,
    MAX_IOVECS, ROLE_CLIENT, ROLE_SERVER, RawSockaddr, SOCKET_FLAG_TLS, SocketInfo, SocketKey, TRACED_FLAG_TLS,
    counter,
};

use crate::maps::{
    Call, DataScratch, EVENTS, HAS_CHILDREN, HISTORY_DEPTH, INFLIGHT, Inflight, LAST_READ_FD, PARENTS, SCRATCH,
    SOCKET_HISTORY, SOCKETS, SocketHistory, count, header, output_scratch, save_inflight, settings, submit, submit_now,
    take_inflight, traced_current, traced_current_flags,
};

const EINPROGRESS: i64 = 115;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[inline(always)]
fn arg(ctx: &TracePointContext, index: usize) -> u64 {
    // SAFETY: syscall enter records hold six 8-byte argument slots from offset 16.
    unsafe { ctx.read_at::<u64>(16 + 8 * index) }.unwrap_or(0)
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: syscall exit records hold the return value at offset 16.
    unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1)
}

/// The role of a tracked socket, or None when `fd` is not one. A child of a traced process
/// inherits the sockets its parent had open when it forked: the entry is copied on first use.
#[inline(always)]
pub(crate) fn socket_info(tgid: u32, fd: u32) -> Option<SocketInfo> {
    let key = SocketKey { pid: tgid, fd };
    // SAFETY: read-only lookups; values are copied out.
    if let Some(info) = unsafe { SOCKETS.get(&key) } {
        return (info.closed_ns == 0).then_some(*info);
    }
    let parent = *unsafe { PARENTS.get(&tgid) }?;
    let parent_key = SocketKey { pid: parent.parent, fd };
    let open_at_fork =
        |i: &SocketInfo| i.opened_ns <= parent.fork_ns && (i.closed_ns == 0 || i.closed_ns >= parent.fork_ns);
    let mut found = unsafe { SOCKETS.get(&parent_key) }.copied().filter(|i| open_at_fork(i));
    if found.is_none() {
        // The parent may have reused the fd number since the fork: look at its earlier sockets.
        // SAFETY: read-only lookup; entries are copied out.
        if let Some(history) = unsafe { SOCKET_HISTORY.get(&parent_key) } {
            for i in 0..HISTORY_DEPTH {
                let e = history.entries[i];
                // Slots at and beyond `next` were never written (the ring has not wrapped).
                if (i as u32) < history.next && open_at_fork(&e) {
                    found = Some(e);
                    break;
                }
            }
        }
    }
    let info = found?;
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let copy = SocketInfo { role: info.role, flags: info.flags, opened_ns: now, closed_ns: 0 };
    let _ = SOCKETS.insert(&key, &copy, 0);
    Some(copy)
}

#[inline(always)]
fn socket_role(tgid: u32, fd: u32) -> Option<u32> {
    socket_info(tgid, fd).map(|i| i.role)
}

/// Enter of a syscall that moves data on `fd_slot`: remember its arguments if fd is a socket.
#[inline(always)]
fn enter_data(ctx: &TracePointContext, call: Call, fd_slot: usize, ptr_slot: usize, len_slot: usize) -> u32 {
    let Some((tgid, _, pid_tgid, traced_flags)) = traced_current_flags() else { return 0 };
    let (fd, ptr, len) = (arg(ctx, fd_slot) as u32, arg(ctx, ptr_slot), arg(ctx, len_slot));
    if let Some(rec) = data_call(tgid, pid_tgid, traced_flags, call, fd, ptr, len) {
        save_inflight(pid_tgid, &rec);
    }
    0
}

/// A data syscall of a traced thread on `fd`: the record to emit when it moved plaintext on a
/// tracked socket, None otherwise. Also notes the socket of a TLS call the syscall runs inside.
#[inline(always)]
pub(crate) fn data_call(
    tgid: u32,
    pid_tgid: u64,
    traced_flags: u32,
    call: Call,
    fd: u32,
    ptr: u64,
    len: u64,
) -> Option<Inflight> {
    let Some(info) = socket_info(tgid, fd) else {
        return crate::logs::log_call(tgid, call, fd, ptr, len);
    };
    let role = info.role;
    // Processes without a probed TLS library skip the TLS bookkeeping (three map operations).
    if traced_flags & TRACED_FLAG_TLS != 0 {
        let reading = matches!(call, Call::ReadBuf | Call::ReadVec | Call::ReadMsg);
        // Written only when it changes: a lookup costs much less than an update.
        if reading && unsafe { LAST_READ_FD.get(&pid_tgid) }.copied() != Some(fd) {
            let _ = LAST_READ_FD.insert(&pid_tgid, &fd, 0);
        }
        // Inside SSL_read/SSL_write (or a handshake) this syscall moves ciphertext: it tells
        // which socket the TLS session uses, and is not emitted.
        if crate::tls::note_inner_syscall(tgid, pid_tgid, fd) {
            return None;
        }
    }
    if info.flags & SOCKET_FLAG_TLS != 0 {
        // Ciphertext of a TLS session: its plaintext comes from the TLS probes.
        return None;
    }
    Some(Inflight { call, fd, ptr, len, role, _pad: 0 })
}

/// splice(fd_in, off_in, fd_out, off_out, ...): the socket end, if either is one (only the byte
/// count is reported).
#[inline(always)]
pub(crate) fn splice_call(tgid: u32, fd_in: u32, fd_out: u32) -> Option<Inflight> {
    let (call, fd, role) = if let Some(role) = socket_role(tgid, fd_out) {
        (Call::WriteUncopied, fd_out, role)
    } else if let Some(role) = socket_role(tgid, fd_in) {
        (Call::ReadUncopied, fd_in, role)
    } else {
        return None;
    };
    Some(Inflight { call, fd, ptr: 0, len: 0, role, _pad: 0 })
}

/// Exit of any call whose enter saved an [`Inflight`]: emit what it did. Only traced threads
/// have a slot, so the slot lookup is also the PID filter.
#[inline(always)]
fn exit_call(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(rec) = take_inflight(pid_tgid) else { return 0 };
    finish_call::<MAX_IOVECS>(pid_tgid, &rec, ret(ctx));
    0
}

/// A finished call of a traced thread, with its return value: track the socket it accepted or
/// connected, or emit the data it moved.
#[inline(always)]
pub(crate) fn finish_call<const IOVECS: u32>(pid_tgid: u64, rec: &Inflight, ret: i64) {
    match rec.call {
        Call::Accept | Call::Connect => finish_conn_call(pid_tgid, rec, ret),
        _ if ret > 0 => emit_data::<IOVECS>((pid_tgid >> 32) as u32, pid_tgid as u32, rec, ret as u64, 0),
        _ => {}
    }
}

/// A finished accept or connect: track the socket it made.
#[inline(always)]
pub(crate) fn finish_conn_call(pid_tgid: u64, rec: &Inflight, ret: i64) {
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    match rec.call {
        Call::Accept => on_accepted(tgid, tid, rec, ret),
        Call::Connect => on_connected(tgid, tid, rec, ret),
        _ => {}
    }
}

#[inline(always)]
/// `IOVECS`: iovecs read per call (see `MAX_IOVECS`).
pub(crate) fn emit_data<const IOVECS: u32>(tgid: u32, tid: u32, rec: &Inflight, byte_count: u64, extra_flags: u32) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch, exclusively ours while this program runs.
    let scratch: &mut DataScratch = unsafe { &mut *scratch };
    let log = rec.role & crate::logs::LOG_ROLE != 0;
    let (kind, cap) = match settings() {
        Some(s) if log => (EventKind::LogWrite, s.log_capture_bytes),
        Some(s) => (EventKind::Data, s.capture_bytes),
        None => return,
    };
    let want = byte_count.min((cap as u64).min(MAX_CAPTURE as u64));
    let header_size = size_of::<sonde_common::DataEvent>() as u64;
    if log
        && EVENTS.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64) + header_size + want
            > settings().map_or(0, |s| s.log_ring_limit) as u64
    {
        // Log lines may fill only part of the ring: the rest is kept for socket payloads. Checked
        // before the copy, with the most it may copy.
        count(counter::LOG_DROPS, 1);
        return;
    }

    let (direction, mut flags) = match rec.call {
        Call::ReadBuf | Call::ReadVec | Call::ReadMsg | Call::ReadUncopied => (DIR_INGRESS, 0),
        _ => (DIR_EGRESS, 0),
    };
    let captured = match rec.call {
        Call::ReadBuf | Call::WriteBuf => copy_buf(scratch, 0, rec.ptr, want),
        // One call site for the iovec walk: the verifier walks every copy of the loop.
        Call::ReadVec | Call::WriteVec | Call::ReadMsg | Call::WriteMsg => {
            let [iov, iovlen] = if matches!(rec.call, Call::ReadMsg | Call::WriteMsg) {
                // struct user_msghdr: msg_iov at 16, msg_iovlen at 24, read in one helper call.
                // SAFETY: user pointer read with the fault-tolerant helper.
                unsafe { bpf_probe_read_user((rec.ptr + 16) as *const [u64; 2]) }.unwrap_or([0, 0])
            } else {
                [rec.ptr, rec.len]
            };
            copy_iovecs::<IOVECS>(scratch, iov, iovlen, want)
        }
        _ => {
            flags |= DATA_FLAG_UNCOPIED;
            0
        }
    };

    scratch.event.header = header(kind, tgid, tid);
    if !log && rec.role == ROLE_SERVER && settings().is_some_and(|s| s.inject_http != 0) {
        crate::inject::note_server_io(((tgid as u64) << 32) | tid as u64, scratch.event.header.ts_ns);
    }
    scratch.event.fd = rec.fd;
    scratch.event.direction = direction;
    scratch.event.byte_count = byte_count;
    scratch.event.captured_len = captured as u32;
    scratch.event.flags = flags | extra_flags;
    scratch.event.role = rec.role & 0xff;

    let rc = output_scratch(scratch, header_size + (captured & (2 * MAX_CAPTURE as u64 - 1)));
    if log {
        count(if rc < 0 { counter::LOG_DROPS } else { counter::LOG_EVENTS }, 1);
    } else if rc < 0 {
        crate::maps::count_loss();
    } else {
        if extra_flags & DATA_FLAG_TLS != 0 {
            count(counter::TLS_EVENTS, 1);
        }
        count(counter::DATA_EVENTS, 1);
        count(counter::BYTES_CAPTURED, captured);
    }
}

/// Copies up to `want` bytes from a user buffer into the scratch payload at `offset`.
/// Returns the bytes copied (0 on a fault).
#[inline(always)]
fn copy_buf(scratch: &mut DataScratch, offset: u64, src: u64, want: u64) -> u64 {
    // Masks give the verifier its bounds: offset < MAX_CAPTURE, len < 2 * MAX_CAPTURE,
    // and the payload area is 3 * MAX_CAPTURE long. `black_box` keeps LLVM from dropping a mask
    // it can prove redundant: verifiers before 6.x cannot follow that proof (a bound learnt from
    // comparing two registers), so the mask must stay in the code they check.
    let offset = core::hint::black_box(offset) & (MAX_CAPTURE as u64 - 1);
    let len = core::hint::black_box(want) & (2 * MAX_CAPTURE as u64 - 1);
    if len == 0 {
        return 0;
    }
    // SAFETY: destination bounded as above; the helper tolerates faults on the user pointer.
    let rc = unsafe {
        probe_read_user_raw(
            scratch.payload.as_mut_ptr().add(offset as usize).cast(),
            len as u32,
            src as *const core::ffi::c_void,
        )
    };
    if rc < 0 { 0 } else { len }
}

/// Copies the first `want` bytes spread over an iovec array (at most `IOVECS` entries).
#[inline(always)]
fn copy_iovecs<const IOVECS: u32>(scratch: &mut DataScratch, iov: u64, iovcnt: u64, want: u64) -> u64 {
    let mut copied: u64 = 0;
    let n = iovcnt.min(IOVECS as u64);
    for i in 0..IOVECS as u64 {
        if i >= n || copied >= want {
            break;
        }
        // struct iovec { void *iov_base; size_t iov_len; }, read in one helper call.
        // SAFETY: user pointer read with the fault-tolerant helper.
        let [base, len] = unsafe { bpf_probe_read_user((iov + i * 16) as *const [u64; 2]) }.unwrap_or([0, 0]);
        let take = len.min(want - copied);
        let got = copy_buf(scratch, copied, base, take);
        if got != take {
            break;
        }
        copied += got;
    }
    copied
}

#[inline(always)]
fn read_sockaddr(ptr: u64) -> RawSockaddr {
    let mut out = RawSockaddr::EMPTY;
    if ptr == 0 {
        return out;
    }
    // SAFETY: user pointer read with the fault-tolerant helper.
    let Ok(raw) = (unsafe { bpf_probe_read_user(ptr as *const [u8; 24]) }) else { return out };
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    out.port_be = u16::from_ne_bytes([raw[2], raw[3]]);
    match family {
        AF_INET => out.addr[..4].copy_from_slice(&raw[4..8]),
        AF_INET6 => out.addr.copy_from_slice(&raw[8..24]),
        _ => return RawSockaddr { family, ..RawSockaddr::EMPTY },
    }
    out.family = family;
    out
}

/// Keeps the socket a new one replaces at the same (tgid, fd), for children forked before.
#[inline(always)]
fn remember_previous(key: &SocketKey, previous: SocketInfo) {
    if let Some(history) = SOCKET_HISTORY.get_ptr_mut(key) {
        // SAFETY: the pointer is to this map's value; BPF programs on other CPUs may write the
        // same entry, which at worst loses one history slot.
        let h = unsafe { &mut *history };
        let slot = (h.next as usize) % HISTORY_DEPTH;
        h.entries[slot] = previous;
        h.next = h.next.wrapping_add(1);
        return;
    }
    let empty = SocketInfo { role: 0, flags: 0, opened_ns: 0, closed_ns: 0 };
    let mut fresh = SocketHistory { entries: [empty; HISTORY_DEPTH], next: 1, _pad: 0 };
    fresh.entries[0] = previous;
    let _ = SOCKET_HISTORY.insert(key, &fresh, 0);
}

#[inline(always)]
fn track_socket(tgid: u32, tid: u32, fd: u32, role: u32, listen_fd: u32, peer: RawSockaddr, local: RawSockaddr) {
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let key = SocketKey { pid: tgid, fd };
    // SAFETY: read-only lookups; values are copied out.
    if unsafe { HAS_CHILDREN.get(&tgid) }.is_some()
        && let Some(previous) = unsafe { SOCKETS.get(&key) }.copied()
    {
        remember_previous(&key, previous);
    }
    let _ = SOCKETS.insert(&key, &SocketInfo { role, flags: 0, opened_ns: now, closed_ns: 0 }, 0);
    let event = ConnEvent { header: header(EventKind::ConnOpen, tgid, tid), fd, role, listen_fd, _pad: 0, peer, local };
    if peer.family == 0 {
        // accept without an address buffer (libuv does this): user space reads the addresses
        // from /proc, which it can do only while the socket lives, so it is woken at once.
        submit_now(&event);
    } else {
        submit(&event);
    }
}

#[inline(always)]
fn on_accepted(tgid: u32, tid: u32, rec: &Inflight, ret: i64) {
    if ret < 0 {
        return;
    }
    let peer = read_sockaddr(rec.ptr);
    // Unix-domain peers are not traced; an unknown family (no address buffer) may still be TCP.
    if peer.family != 0 && peer.family != AF_INET && peer.family != AF_INET6 {
        return;
    }
    track_socket(tgid, tid, ret as u32, ROLE_SERVER, rec.fd, peer, RawSockaddr::EMPTY);
}

#[inline(always)]
fn on_connected(tgid: u32, tid: u32, rec: &Inflight, ret: i64) {
    if ret != 0 && ret != -EINPROGRESS {
        return;
    }
    let peer = read_sockaddr(rec.ptr);
    if peer.family != AF_INET && peer.family != AF_INET6 {
        return;
    }
    track_socket(tgid, tid, rec.fd, ROLE_CLIENT, u32::MAX, peer, RawSockaddr::EMPTY);
}

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const IPPROTO_TCP: u16 = 6;

/// Kernel socket address -> the traced (process, fd) connecting it, from its SYN_SENT transition
/// (inside connect, in the caller's context) until it is established or closed.
#[map]
static CONNECTING: LruHashMap<u64, SocketKey> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

/// TCP state changes, kept only for sockets a traced thread connects: when one is established
/// its own address and port (which the kernel picks inside connect, after SYN_SENT) are reported,
/// so user space can find the server end of a connection between two traced processes. The
/// transition may run in softirq context on any CPU, so the socket is recognised by its kernel
/// address, never by the current task. It precedes the client's first byte: a socket sends no
/// data before it is established.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let Some(s) = settings() else { return 0 };
    // SAFETY: offsets taken from this kernel's format file; reads are bounds-checked helpers.
    let u16_at = |off: u32| unsafe { ctx.read_at::<u16>(off as usize) }.unwrap_or(0);
    let i32_at = |off: u32| unsafe { ctx.read_at::<i32>(off as usize) }.unwrap_or(0);
    if u16_at(s.sock_protocol_offset) != IPPROTO_TCP {
        return 0;
    }
    let sk = unsafe { ctx.read_at::<u64>(s.sock_skaddr_offset as usize) }.unwrap_or(0);
    match (i32_at(s.sock_oldstate_offset), i32_at(s.sock_newstate_offset)) {
        (_, TCP_SYN_SENT) => {
            let Some((tgid, _, pid_tgid)) = traced_current() else { return 0 };
            // SAFETY: this thread's slot, copied out.
            let Some(rec) = INFLIGHT.get_ptr_mut(&pid_tgid).map(|r| unsafe { *r }) else { return 0 };
            if rec.call == Call::Connect {
                let _ = CONNECTING.insert(&sk, &SocketKey { pid: tgid, fd: rec.fd }, 0);
            }
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            // SAFETY: value copied out before removal.
            let Some(owner) = (unsafe { CONNECTING.get(&sk) }).copied() else { return 0 };
            let _ = CONNECTING.remove(&sk);
            let family = u16_at(s.sock_family_offset);
            let mut local = RawSockaddr { family, port_be: u16_at(s.sock_sport_offset).to_be(), addr: [0; 16] };
            match family {
                AF_INET => {
                    let v4 = unsafe { ctx.read_at::<[u8; 4]>(s.sock_saddr_offset as usize) }.unwrap_or([0; 4]);
                    local.addr[..4].copy_from_slice(&v4);
                }
                AF_INET6 => {
                    local.addr = unsafe { ctx.read_at::<[u8; 16]>(s.sock_saddr_v6_offset as usize) }.unwrap_or([0; 16])
                }
                _ => return 0,
            }
            if settings().is_some_and(|s| s.inject_http != 0) {
                let mut key = sonde_common::InjectKey {
                    family: family as u32,
                    local_port: u16_at(s.sock_sport_offset) as u32,
                    remote_port: u16_at(s.sock_dport_offset) as u32,
                    _pad: 0,
                    local: local.addr,
                    remote: [0; 16],
                };
                if family == AF_INET {
                    key.remote[..4].copy_from_slice(
                        &unsafe { ctx.read_at::<[u8; 4]>(s.sock_daddr_offset as usize) }.unwrap_or([0; 4]),
                    );
                } else {
                    key.remote = unsafe { ctx.read_at::<[u8; 16]>(s.sock_daddr_v6_offset as usize) }.unwrap_or([0; 16]);
                }
                crate::inject::mark_candidate(&key, &owner);
            }
            submit(&ConnEvent {
                header: header(EventKind::ConnLocal, owner.pid, 0),
                fd: owner.fd,
                role: ROLE_CLIENT,
                listen_fd: u32::MAX,
                _pad: 0,
                peer: RawSockaddr::EMPTY,
                local,
            });
        }
        (_, TCP_CLOSE) => {
            let _ = CONNECTING.remove(&sk);
        }
        _ => {}
    }
    0
}

/// Enter of accept/connect: any traced thread, any fd (the socket is not tracked yet).
#[inline(always)]
fn enter_conn(ctx: &TracePointContext, call: Call) -> u32 {
    let Some((_, _, pid_tgid)) = traced_current() else { return 0 };
    save_inflight(pid_tgid, &Inflight { call, fd: arg(ctx, 0) as u32, ptr: arg(ctx, 1), len: 0, role: 0, _pad: 0 });
    0
}

/// splice(fd_in, off_in, fd_out, off_out, len, flags): only the byte count matters.
#[tracepoint]
pub fn sys_enter_splice(ctx: TracePointContext) -> u32 {
    let Some((tgid, _, pid_tgid)) = traced_current() else { return 0 };
    if let Some(rec) = splice_call(tgid, arg(&ctx, 0) as u32, arg(&ctx, 2) as u32) {
        save_inflight(pid_tgid, &rec);
    }
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid, _)) = traced_current() else { return 0 };
    let fd = arg(&ctx, 0) as u32;
    if crate::logs::on_close(tgid, tid, fd) {
        return 0;
    }
    let key = SocketKey { pid: tgid, fd };
    // SAFETY: the value is copied out.
    let Some(info) = (unsafe { SOCKETS.get(&key) }).copied() else { return 0 };
    if info.closed_ns != 0 {
        return 0;
    }
    // SAFETY: read-only lookup.
    if unsafe { HAS_CHILDREN.get(&tgid) }.is_some() {
        // Children forked while it was open may still use it: keep a tombstone.
        let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
        let _ = SOCKETS.insert(&key, &SocketInfo { closed_ns: now, ..info }, 0);
    } else {
        let _ = SOCKETS.remove(&key);
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
    0
}

macro_rules! data_enter {
    ($name:ident, $call:expr, $fd:expr, $ptr:expr, $len:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            enter_data(&ctx, $call, $fd, $ptr, $len)
        }
    };
}

macro_rules! call_exit {
    ($($name:ident),* $(,)?) => {$(
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            exit_call(&ctx)
        }
    )*};
}

// read(fd, buf, count), write(fd, buf, count), recvfrom/sendto(fd, buf, len, ...)
data_enter!(sys_enter_read, Call::ReadBuf, 0, 1, 2);
data_enter!(sys_enter_write, Call::WriteBuf, 0, 1, 2);
data_enter!(sys_enter_sendto, Call::WriteBuf, 0, 1, 2);
// readv/writev(fd, iov, iovcnt)
data_enter!(sys_enter_readv, Call::ReadVec, 0, 1, 2);
data_enter!(sys_enter_writev, Call::WriteVec, 0, 1, 2);
// recvmsg/sendmsg(fd, msg, flags)
data_enter!(sys_enter_sendmsg, Call::WriteMsg, 0, 1, 2);
// sendfile64(out_fd, in_fd, offset, count)
data_enter!(sys_enter_sendfile64, Call::WriteUncopied, 0, 2, 3);

/// MSG_PEEK: the bytes stay queued and the next read returns them again, so a peek is not
/// data (curl peeks one byte to test a connection before reusing it).
pub(crate) const MSG_PEEK: u64 = 2;

/// recvfrom(fd, buf, len, flags, ...)
#[tracepoint]
pub fn sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 3) & MSG_PEEK != 0 {
        return 0;
    }
    enter_data(&ctx, Call::ReadBuf, 0, 1, 2)
}

/// recvmsg(fd, msg, flags)
#[tracepoint]
pub fn sys_enter_recvmsg(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 2) & MSG_PEEK != 0 {
        return 0;
    }
    enter_data(&ctx, Call::ReadMsg, 0, 1, 2)
}

#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    enter_conn(&ctx, Call::Accept)
}

#[tracepoint]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    enter_conn(&ctx, Call::Accept)
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    enter_conn(&ctx, Call::Connect)
}

call_exit!(
    sys_exit_read,
    sys_exit_write,
    sys_exit_recvfrom,
    sys_exit_sendto,
    sys_exit_readv,
    sys_exit_writev,
    sys_exit_recvmsg,
    sys_exit_sendmsg,
    sys_exit_sendfile64,
    sys_exit_splice,
    sys_exit_accept,
    sys_exit_accept4,
    sys_exit_connect,
);
