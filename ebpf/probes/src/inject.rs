//! Opt-in traceparent injection into outgoing HTTP/1.x requests of traced processes.
//!
//! The sock tracepoint marks a traced process's connection as a candidate when it is established
//! (it knows the owner from `connect`); the sockops program, called right after on the same
//! socket, puts it in `INJECT_SOCKS`; the sk_msg program then sees every message the application
//! sends on it. It rewrites a message only when it is sure where a request starts: a connection
//! is followed from its first byte, each request's body is skipped by its Content-Length, and the
//! header goes into a request head that is complete in the message. Anything else (another
//! protocol, a chunked body, pipelining, a head split over messages) gives the connection up:
//! counted, reported, and never touched again. Nothing is ever removed from a message.

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, sk_action::SK_PASS},
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_msg_pull_data},
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use sonde_common::{
    EventKind, InjectEvent, InjectKey, InjectState, MAX_INFLIGHT, SocketKey, ThreadContext, inject_reason,
};

use crate::maps::{header, settings, submit};

/// Connections of traced processes established but not yet in the sock hash (written by the sock
/// tracepoint, taken by the sockops program a moment later on the same socket).
#[map]
pub static INJECT_CANDIDATES: LruHashMap<InjectKey, SocketKey> = LruHashMap::with_max_entries(4096, 0);

/// The sockets whose messages the sk_msg program sees.
#[map]
pub static INJECT_SOCKS: SockHash<InjectKey> = SockHash::with_max_entries(65536, 0);

/// Where each of those connections stands.
#[map]
pub static INJECT_STATE: LruHashMap<InjectKey, InjectState> = LruHashMap::with_max_entries(65536, 0);

/// pid_tgid -> the server request the thread serves (written by user space).
#[map]
pub static THREAD_CONTEXT: HashMap<u64, ThreadContext> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// pid_tgid -> kernel time of the thread's latest read or write on a server socket (the time
/// its data event carries). Written by the data hooks only while injection is on.
#[map]
pub static SERVER_IO: HashMap<u64, u64> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Per-CPU counts, indexed by `inject_reason`.
#[map]
pub static INJECT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(inject_reason::COUNT, 0);

/// Per-CPU scan state of the message being examined. Kept in map memory, not registers, so the
/// verifier does not follow one path per combination of findings through the scan loop.
#[map]
static INJECT_SCAN: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scan {
    /// The last four bytes seen.
    window: u32,
    /// Offset just past the request line's `\n` (0: not seen yet).
    line_end: u32,
    /// Offset just past the head's final `\r\n\r\n` (0: not seen yet).
    head_end: u32,
    has_traceparent: u32,
    /// Transfer-Encoding or Upgrade: the bytes after this request's head are not a known length.
    length_unknown: u32,
    /// Offset of a Content-Length value (0: none).
    content_length_at: u32,
    /// Bytes of the message copied into `head`.
    copied: u32,
    /// The Content-Length being read, and its digits so far.
    digits: u32,
    number: u64,
    /// Header lines found, and where each starts.
    lines: u32,
    line_starts: [u16; MAX_LINES],
    /// The start of the message, copied out of it word by word (with slack for reads past the
    /// window).
    head: [u64; WORDS + 4],
    /// The header line being written.
    line: [u8; TRACEPARENT_LINE],
    /// The report being assembled (too large for the BPF stack next to the rest).
    event: InjectEvent,
}

/// How far into a message the head is looked for. Heads longer than this (large cookies) give
/// the connection up rather than being guessed at.
const HEAD_SCAN: u32 = 2048;
const MASK: usize = HEAD_SCAN as usize - 1;
const WORDS: usize = HEAD_SCAN as usize / 8;
/// Header lines looked at; a head with more gives the connection up.
const MAX_LINES: usize = 64;
/// `traceparent: 00-<32 hex>-<16 hex>-<2 hex>\r\n`.
const TRACEPARENT_LINE: usize = 70;

/// The sock tracepoint's part, for a traced process's connection that just became established.
#[inline(always)]
pub fn mark_candidate(key: &InjectKey, owner: &SocketKey) {
    let _ = INJECT_CANDIDATES.insert(key, owner, 0);
}

/// Called on TCP events of every socket in the cgroup; acts on an active open that the sock
/// tracepoint marked a moment earlier.
#[sock_ops]
pub fn sonde_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 0;
    }
    // SAFETY: reads of the context the kernel passed.
    let ops = unsafe { &mut *ctx.ops };
    let mut key = InjectKey {
        family: ops.family,
        local_port: ops.local_port,
        remote_port: port_from_ctx(ops.remote_port),
        _pad: 0,
        local: [0; 16],
        remote: [0; 16],
    };
    fill_addrs(&mut key, ops.local_ip4, ops.remote_ip4, ops.local_ip6, ops.remote_ip6);
    // SAFETY: copied out before removal.
    let Some(owner) = (unsafe { INJECT_CANDIDATES.get(&key) }).copied() else { return 0 };
    let _ = INJECT_CANDIDATES.remove(&key);
    let state = InjectState { pid: owner.pid, fd: owner.fd, sent: 0, body_left: 0, gave_up: 0, _pad: 0 };
    if INJECT_STATE.insert(&key, &state, 0).is_ok() {
        let _ = INJECT_SOCKS.update(key, ops, 0);
    }
    0
}

/// Every message a traced process sends on a connection in `INJECT_SOCKS`. Always lets it pass.
#[sk_msg]
pub fn sonde_inject(ctx: SkMsgContext) -> u32 {
    on_message(&ctx);
    SK_PASS
}

#[inline(always)]
fn on_message(ctx: &SkMsgContext) {
    // SAFETY: reads of the context the kernel passed.
    let md = unsafe { &*ctx.msg };
    let mut key = InjectKey {
        family: md.family,
        local_port: md.local_port,
        remote_port: port_from_ctx(md.remote_port),
        _pad: 0,
        local: [0; 16],
        remote: [0; 16],
    };
    fill_addrs(&mut key, md.local_ip4, md.remote_ip4, md.local_ip6, md.remote_ip6);
    let size = md.size as u64;
    let Some(scan) = INJECT_SCAN.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch, ours while the program runs.
    let scan = unsafe { &mut *scan };
    let Some(state) = INJECT_STATE.get_ptr_mut(&key) else { return };
    // SAFETY: the map value stays alive while the program runs; one connection's messages are
    // sent under its socket lock, so no other program run writes it meanwhile.
    let state = unsafe { &mut *state };
    let offset = state.sent;
    state.sent += size;
    if state.gave_up != 0 {
        return;
    }
    if state.body_left >= size {
        state.body_left -= size;
        return;
    }
    if state.body_left > 0 {
        // A request starts inside this message: its head is not where a rewrite can be sure.
        give_up(scan, state, &key, inject_reason::PIPELINED);
        return;
    }
    let want = if size < HEAD_SCAN as u64 { size as u32 } else { HEAD_SCAN };
    // SAFETY: helper on the message the kernel passed.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, want, 0) } != 0 {
        give_up(scan, state, &key, inject_reason::REWRITE_FAILED);
        return;
    }
    if !starts_with_method(ctx) {
        give_up(scan, state, &key, inject_reason::NOT_HTTP1);
        return;
    }
    scan_head(ctx, scan);
    let head_end = read(&scan.head_end);
    let line_end = read(&scan.line_end);
    if head_end == 0 || line_end == 0 {
        give_up(scan, state, &key, inject_reason::HEAD_INCOMPLETE);
        return;
    }
    let body_here = size - head_end as u64;
    let length_unknown = read(&scan.length_unknown) != 0;
    let content_length = content_length(scan, read(&scan.content_length_at));
    // What follows this request in the stream, if anything can be known of it.
    let after = if length_unknown {
        Some(inject_reason::BODY_UNKNOWN)
    } else if body_here > content_length {
        Some(inject_reason::PIPELINED)
    } else {
        state.body_left = content_length - body_here;
        None
    };
    if read(&scan.has_traceparent) != 0 {
        count(inject_reason::TRACEPARENT_PRESENT);
    } else if write_traceparent(ctx, scan, line_end, state, &key, offset) {
        count(inject_reason::INJECTED);
    } else {
        give_up(scan, state, &key, inject_reason::REWRITE_FAILED);
        return;
    }
    if let Some(reason) = after {
        give_up(scan, state, &key, reason);
    }
}

/// The request line starts with one of the methods HTTP/1.x clients send.
#[inline(always)]
fn starts_with_method(ctx: &SkMsgContext) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 4 > end {
        return false;
    }
    // SAFETY: bounds checked against data_end just above.
    let word = unsafe { core::ptr::read_unaligned(data as *const u32) };
    [b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI"].iter().any(|m| word == u32::from_le_bytes(**m))
}

/// Finds the request line's end, the head's end, and the headers that matter. The linear start
/// of the message is copied out first, then scanned in two short passes (line starts, then the
/// header names at each), so that the verifier's work stays linear in the scan window.
#[inline(always)]
fn scan_head(ctx: &SkMsgContext, scan: &mut Scan) {
    write(&mut scan.line_end, 0);
    write(&mut scan.head_end, 0);
    write(&mut scan.has_traceparent, 0);
    write(&mut scan.length_unknown, 0);
    write(&mut scan.content_length_at, 0);
    write(&mut scan.lines, 0);
    let (data, end) = (ctx.data(), ctx.data_end());
    write(&mut scan.copied, 0);
    // Word by word: the verifier walks every iteration of a loop, so the fewer the better.
    // `black_box` keeps LLVM from unrolling the loops (unrolled, each iteration is new code to
    // the verifier and the program exceeds its budget).
    for w in 0..core::hint::black_box(WORDS) {
        let p = data + w * 8;
        if p + 8 > end {
            break;
        }
        // SAFETY: bounds checked just above.
        scan.head[w & (WORDS - 1)] = unsafe { core::ptr::read_unaligned(p as *const u64) };
        // Through memory: as a register, every possible length would be a state of its own in
        // the loops below.
        write(&mut scan.copied, (w as u32 + 1) * 8);
    }
    // The last bytes, fewer than a word, one at a time into the next word (state in memory, as
    // everywhere here: what a register carries multiplies the verifier's states).
    let whole = read(&scan.copied) as usize & (2 * HEAD_SCAN as usize - 1);
    if whole < HEAD_SCAN as usize {
        let slot = (whole / 8) & (WORDS - 1);
        scan.head[slot] = 0;
        copy_tail(scan, data, end, whole, slot);
    }
    write(&mut scan.window, 0);
    // Lengths are re-read from memory at each test: a register would carry what each test
    // taught the verifier into the next iteration, a state of its own per length.
    'words: for w in 0..core::hint::black_box(WORDS) {
        if w * 8 >= read(&scan.copied) as usize {
            break;
        }
        let x = scan.head[w & (WORDS - 1)];
        // Whether any byte of the word is '\n' (exact: no false negatives, none positive).
        let y = x ^ 0x0a0a_0a0a_0a0a_0a0a;
        if y.wrapping_sub(0x0101_0101_0101_0101) & !y & 0x8080_8080_8080_8080 == 0 {
            let last3 = (((x >> 40) & 0xff) << 16) | (((x >> 48) & 0xff) << 8) | ((x >> 56) & 0xff);
            write(&mut scan.window, last3 as u32);
            continue;
        }
        for b in 0..8 {
            let at = w * 8 + b;
            if at >= read(&scan.copied) as usize {
                break;
            }
            let byte = ((x >> (8 * b)) & 0xff) as u32;
            let window = (read(&scan.window) << 8) | byte;
            write(&mut scan.window, window);
            if byte == b'\n' as u32 && !on_newline(scan, window, at) {
                // The head ended (or has too many lines): on to the header names.
                break 'words;
            }
        }
    }
    for k in 0..core::hint::black_box(MAX_LINES) {
        if k >= read(&scan.lines) as usize {
            break;
        }
        let at = scan.line_starts[k & (MAX_LINES - 1)] as usize & MASK;
        // Lower-cased by setting bit 5 of every byte (letters, digits, '-' and ':' compare as
        // they should). The buffer has slack after the window for these reads.
        let bytes = head_bytes(&scan.head);
        let word = |off: usize| -> u64 {
            let b = &bytes[at + off..at + off + 8];
            u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) | 0x2020_2020_2020_2020
        };
        let first = word(0);
        if first == name(b"tracepar") && word(4) == name(b"eparent:") {
            write(&mut scan.has_traceparent, 1);
        } else if first == name(b"content-") && word(7) == name(b"-length:") {
            write(&mut scan.content_length_at, (at + 15) as u32);
        } else if (first == name(b"transfer") && word(10) == name(b"ncoding:")) || first == name(b"upgrade:") {
            write(&mut scan.length_unknown, 1);
        }
    }
}

/// Copies the message's last bytes (fewer than a word) after `whole` into word `slot`.
/// Straight-line code, as in `content_length`.
#[inline(always)]
fn copy_tail(scan: &mut Scan, data: usize, end: usize, whole: usize, slot: usize) {
    macro_rules! tail_byte {
        ($($j:literal)*) => {$(
            let p = data + whole + $j;
            if p + 1 > end {
                return;
            }
            // SAFETY: bounds checked just above; `slot` is inside `head`.
            let b = unsafe { *(p as *const u8) } as u64;
            let word = unsafe { core::ptr::read_volatile(&scan.head[slot]) };
            unsafe { core::ptr::write_volatile(&mut scan.head[slot], word | (b << (8 * $j))) };
            write(&mut scan.copied, (whole + $j + 1) as u32);
        )*};
    }
    tail_byte!(0 1 2 3 4 5 6);
}

/// A `\n` at offset `at`, `window` its last four bytes: records a line start, or the head's end.
/// False when the scan is over.
#[inline(always)]
fn on_newline(scan: &mut Scan, window: u32, at: usize) -> bool {
    if window & 0x00ff_ffff == 0x000a_0d0a {
        write(&mut scan.head_end, at as u32 + 1);
        return false;
    }
    if read(&scan.line_end) == 0 {
        write(&mut scan.line_end, at as u32 + 1);
    }
    let n = read(&scan.lines);
    if n as usize >= MAX_LINES {
        // More header lines than are checked: the head is treated as incomplete.
        write(&mut scan.line_end, 0);
        return false;
    }
    scan.line_starts[n as usize & (MAX_LINES - 1)] = at as u16 + 1;
    write(&mut scan.lines, n + 1);
    true
}

/// The decimal value at `at` in the copied head (after optional blanks); 0 when there is none.
#[inline(always)]
fn content_length(scan: &mut Scan, at: u32) -> u64 {
    if at == 0 {
        return 0;
    }
    let start = at as usize & MASK;
    let bytes = head_bytes(&scan.head);
    write64(&mut scan.number, 0);
    write(&mut scan.digits, 0);
    // Straight-line code, not a loop: LLVM lays a short loop like this one out with a
    // fall-through back-edge, which verifiers before 6.x reject.
    macro_rules! step {
        ($($i:literal)*) => {$(
            let b = bytes[(start + $i).min(bytes.len() - 1)];
            let digits = read(&scan.digits);
            if !((b == b' ' || b == b'\t') && digits == 0) {
                if !b.is_ascii_digit() || digits >= 19 {
                    return read64(&scan.number);
                }
                let number = read64(&scan.number) * 10 + (b - b'0') as u64;
                write64(&mut scan.number, number);
                write(&mut scan.digits, digits + 1);
            }
        )*};
    }
    step!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27);
    read64(&scan.number)
}

/// Inserts the header line after the request line and reports the ids it carries.
#[inline(always)]
fn write_traceparent(
    ctx: &SkMsgContext,
    scan: &mut Scan,
    line_end: u32,
    state: &InjectState,
    key: &InjectKey,
    offset: u64,
) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let ev = &mut scan.event;
    for chunk in 0..2 {
        // SAFETY: helper with no arguments.
        let r = unsafe { bpf_get_prandom_u32() }.to_ne_bytes();
        ev.span_id[chunk * 4..chunk * 4 + 4].copy_from_slice(&r);
    }
    let sampled = match current_context(pid_tgid) {
        Some(parent) => {
            ev.trace_id = parent.trace_id;
            ev.parent_id = parent.span_id;
            ev.has_parent = 1;
            parent.sampled != 0
        }
        None => {
            for chunk in 0..4 {
                // SAFETY: helper with no arguments.
                let r = unsafe { bpf_get_prandom_u32() }.to_ne_bytes();
                ev.trace_id[chunk * 4..chunk * 4 + 4].copy_from_slice(&r);
            }
            ev.parent_id = [0; 8];
            ev.has_parent = 0;
            let t = &ev.trace_id;
            let low = u64::from_be_bytes([t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15]]);
            (low >> 1) < settings().map(|s| s.sample_bound).unwrap_or(u64::MAX)
        }
    };

    const HEX: &[u8; 16] = b"0123456789abcdef";
    let line = &mut scan.line;
    line[..16].copy_from_slice(b"traceparent: 00-");
    for i in 0..16 {
        line[16 + 2 * i] = HEX[(ev.trace_id[i] >> 4) as usize];
        line[17 + 2 * i] = HEX[(ev.trace_id[i] & 15) as usize];
    }
    line[48] = b'-';
    for i in 0..8 {
        line[49 + 2 * i] = HEX[(ev.span_id[i] >> 4) as usize];
        line[50 + 2 * i] = HEX[(ev.span_id[i] & 15) as usize];
    }
    line[65..70].copy_from_slice(if sampled { b"-01\r\n" } else { b"-00\r\n" });

    let at = line_end & (HEAD_SCAN - 1);
    // SAFETY: helpers on the message the kernel passed; `at` is inside the message (the head
    // ends after it).
    unsafe {
        if aya_ebpf::helpers::bpf_msg_push_data(ctx.msg, at, TRACEPARENT_LINE as u32, 0) != 0 {
            return false;
        }
        if bpf_msg_pull_data(ctx.msg, at, at + TRACEPARENT_LINE as u32, 0) != 0 {
            return false;
        }
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + TRACEPARENT_LINE > end {
        return false;
    }
    for i in 0..TRACEPARENT_LINE {
        // SAFETY: data + TRACEPARENT_LINE <= data_end, checked above.
        unsafe { *((data + i) as *mut u8) = line[i] };
    }
    ev.header = header(EventKind::Inject, state.pid, pid_tgid as u32);
    ev.fd = state.fd;
    ev.reason = inject_reason::INJECTED;
    ev.offset = offset;
    ev.sampled = sampled as u32;
    ev.key = *key;
    submit(&scan.event);
    true
}

/// The context user space wrote for this thread, if the thread did no server I/O since the read
/// it was decided on.
#[inline(always)]
fn current_context(pid_tgid: u64) -> Option<ThreadContext> {
    // SAFETY: values copied out.
    let ctx = unsafe { THREAD_CONTEXT.get(&pid_tgid) }.copied()?;
    let last = unsafe { SERVER_IO.get(&pid_tgid) }.copied()?;
    if ctx.io_ts_ns == last {
        Some(ctx)
    } else {
        count(inject_reason::NO_CURRENT_CONTEXT);
        None
    }
}

/// The data hooks' part: a traced thread read or wrote on a server socket at `ts_ns`.
#[inline(always)]
pub fn note_server_io(pid_tgid: u64, ts_ns: u64) {
    crate::maps::write_slot(&SERVER_IO, pid_tgid, &ts_ns);
}

/// Stops following the connection, and tells user space to take it out of the sock hash.
#[inline(always)]
fn give_up(scan: &mut Scan, state: &mut InjectState, key: &InjectKey, reason: u32) {
    state.gave_up = reason;
    count(reason);
    let ev = &mut scan.event;
    ev.header = header(EventKind::Inject, state.pid, bpf_get_current_pid_tgid() as u32);
    ev.fd = state.fd;
    ev.reason = reason;
    ev.offset = state.sent;
    ev.trace_id = [0; 16];
    ev.span_id = [0; 8];
    ev.sampled = 0;
    ev.has_parent = 0;
    ev.parent_id = [0; 8];
    ev.key = *key;
    submit(&scan.event);
}

#[inline(always)]
fn count(reason: u32) {
    if let Some(slot) = INJECT_COUNTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// The remote port as the context gives it (network order in the upper 16 bits on little-endian
/// kernels), in host order.
#[inline(always)]
fn port_from_ctx(raw: u32) -> u32 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16) as u32
}

#[inline(always)]
fn fill_addrs(key: &mut InjectKey, local4: u32, remote4: u32, local6: [u32; 4], remote6: [u32; 4]) {
    if key.family == AF_INET {
        key.local[..4].copy_from_slice(&local4.to_ne_bytes());
        key.remote[..4].copy_from_slice(&remote4.to_ne_bytes());
    } else {
        for i in 0..4 {
            key.local[i * 4..i * 4 + 4].copy_from_slice(&local6[i].to_ne_bytes());
            key.remote[i * 4..i * 4 + 4].copy_from_slice(&remote6[i].to_ne_bytes());
        }
    }
}

const AF_INET: u32 = 2;

/// The copied head as bytes.
#[inline(always)]
fn head_bytes(head: &[u64; WORDS + 4]) -> &[u8; (WORDS + 4) * 8] {
    // SAFETY: same size, u8 has no alignment requirement.
    unsafe { &*(head.as_ptr() as *const [u8; (WORDS + 4) * 8]) }
}

#[inline(always)]
const fn name(s: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*s)
}

#[inline(always)]
fn read(v: &u32) -> u32 {
    // SAFETY: a reference to map memory.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn read64(v: &u64) -> u64 {
    // SAFETY: a reference to map memory.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn write64(v: &mut u64, x: u64) {
    // SAFETY: a reference to map memory.
    unsafe { core::ptr::write_volatile(v, x) }
}

#[inline(always)]
fn write(v: &mut u32, x: u32) {
    // SAFETY: a reference to map memory.
    unsafe { core::ptr::write_volatile(v, x) }
}
