//! The data syscalls captured at their exit alone. One raw tracepoint on `sys_exit` receives the
//! user registers the kernel saved at syscall entry and the return value, so the buffer, length
//! and fd of read/write and the rest are read there: no enter hook and no per-thread slot for
//! them (one program run per call instead of two, and no map write). A call that was already
//! blocked when sonde attached is seen too, since only its exit matters.
//!
//! The hook runs for every syscall on the host: the PID filter (one inlined array read) comes
//! first, the registers are read only for traced processes.
//!
//! accept, accept4 and connect end in a program of their own, [`raw_sys_exit_conn`], reached by
//! a tail call: the verifier checks it apart from the iovec walk (inlined into the exit program,
//! it pushed 6.12's verifier past a million instructions). accept is read from the registers
//! there, so the first connection of an accept already blocked when sonde attached is tracked;
//! connect keeps its enter tracepoint (its socket must be known inside the call, at SYN_SENT)
//! and its exit takes the slot the enter filled.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{map, raw_tracepoint},
    maps::ProgramArray,
    programs::RawTracePointContext,
};
use sonde_common::{COMPACT_IOVECS, MAX_IOVECS, TRACED_FLAG_TLS};

use crate::{
    data::{data_call, finish_call, finish_conn_call, splice_call},
    maps::{Call, Inflight, take_inflight, traced_current_flags},
};

/// Slot 0: [`raw_sys_exit_conn`], set by the agent when it attaches the exit program.
#[map]
static CONN_EXIT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Where the syscall number and the first three arguments sit in `struct pt_regs`.
#[cfg(not(bpf_target_arch = "aarch64"))]
mod arch {
    use super::bpf_probe_read_kernel;

    /// `struct pt_regs` from `dx` on: dx, si, di, orig_ax, ip, cs.
    const FROM_DX: u64 = 96;
    /// `__USER32_CS`: a 32-bit process, whose syscall numbers come from another table.
    const USER32_CS: u64 = 0x23;

    /// The syscall number and its first three arguments (rdi, rsi, rdx are not clobbered on the
    /// way out; rax holds the return value, `orig_ax` the number). None for a 32-bit process.
    #[inline(always)]
    pub fn syscall(regs: u64) -> Option<(u64, [u64; 3])> {
        // SAFETY: a kernel pointer from the tracepoint, read with the fault-tolerant helper.
        let [dx, si, di, nr, _ip, cs] = unsafe { bpf_probe_read_kernel((regs + FROM_DX) as *const [u64; 6]) }.ok()?;
        (cs != USER32_CS).then_some((nr, [di, si, dx]))
    }

    /// The fourth argument (r10; `struct pt_regs` puts it at 56).
    #[inline(always)]
    pub fn fourth_arg(regs: u64) -> u64 {
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel((regs + 56) as *const u64) }.unwrap_or(0)
    }

    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDFILE: u64 = 40;
    pub const CONNECT: u64 = 42;
    pub const ACCEPT: u64 = 43;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const SPLICE: u64 = 275;
    pub const ACCEPT4: u64 = 288;
    /// open(path, flags, mode) and creat(path, mode) exist on x86_64 only.
    pub const OPEN: Option<u64> = Some(2);
    pub const CREAT: Option<u64> = Some(85);
    pub const OPENAT: u64 = 257;
}

#[cfg(bpf_target_arch = "aarch64")]
mod arch {
    use super::bpf_probe_read_kernel;

    /// `struct pt_regs`: regs[31], sp, pc, pstate (264), orig_x0 (272), syscallno (280).
    const FROM_PSTATE: u64 = 264;
    /// `PSR_MODE32_BIT`: an AArch32 process, whose syscall numbers come from another table.
    const MODE32: u64 = 0x10;

    /// The syscall number and its first three arguments: x0 holds the return value on the way
    /// out, `orig_x0` the first argument.
    #[inline(always)]
    pub fn syscall(regs: u64) -> Option<(u64, [u64; 3])> {
        // SAFETY: a kernel pointer from the tracepoint, read with the fault-tolerant helper.
        let [x1, x2] = unsafe { bpf_probe_read_kernel((regs + 8) as *const [u64; 2]) }.ok()?;
        let [pstate, x0, nr] = unsafe { bpf_probe_read_kernel((regs + FROM_PSTATE) as *const [u64; 3]) }.ok()?;
        (pstate & MODE32 == 0).then_some((nr as u32 as u64, [x0, x1, x2]))
    }

    /// The fourth argument (x3).
    #[inline(always)]
    pub fn fourth_arg(regs: u64) -> u64 {
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel((regs + 24) as *const u64) }.unwrap_or(0)
    }

    pub const READ: u64 = 63;
    pub const WRITE: u64 = 64;
    pub const READV: u64 = 65;
    pub const WRITEV: u64 = 66;
    pub const SENDFILE: u64 = 71;
    pub const SPLICE: u64 = 76;
    pub const ACCEPT: u64 = 202;
    pub const CONNECT: u64 = 203;
    pub const SENDTO: u64 = 206;
    pub const RECVFROM: u64 = 207;
    pub const SENDMSG: u64 = 211;
    pub const RECVMSG: u64 = 212;
    pub const ACCEPT4: u64 = 242;
    pub const OPEN: Option<u64> = None;
    pub const CREAT: Option<u64> = None;
    pub const OPENAT: u64 = 56;
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit(ctx: RawTracePointContext) -> u32 {
    sys_exit::<MAX_IOVECS>(ctx)
}

/// The same with fewer iovecs per call, for verifiers that refuse the full walk (5.10's stops
/// at a million instructions processed).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_compact(ctx: RawTracePointContext) -> u32 {
    sys_exit::<COMPACT_IOVECS>(ctx)
}

#[inline(always)]
fn sys_exit<const IOVECS: u32>(ctx: RawTracePointContext) -> u32 {
    let Some((tgid, _, pid_tgid, traced_flags)) = traced_current_flags() else { return 0 };
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let Some((nr, [a0, a1, a2])) = arch::syscall(regs) else { return 0 };
    let call = match nr {
        arch::READ => Call::ReadBuf,
        // recvfrom(fd, buf, len, flags, ...), recvmsg(fd, msg, flags): a peek is not data.
        arch::RECVFROM if arch::fourth_arg(regs) & crate::data::MSG_PEEK != 0 => return 0,
        arch::RECVMSG if a2 & crate::data::MSG_PEEK != 0 => return 0,
        arch::RECVFROM => Call::ReadBuf,
        arch::WRITE | arch::SENDTO => Call::WriteBuf,
        arch::READV => Call::ReadVec,
        arch::WRITEV => Call::WriteVec,
        arch::RECVMSG => Call::ReadMsg,
        arch::SENDMSG => Call::WriteMsg,
        // sendfile(out_fd, in_fd, offset, count): the count only.
        arch::SENDFILE => Call::WriteUncopied,
        arch::SPLICE => {
            if ret > 0
                && let Some(rec) = splice_call(tgid, a0 as u32, a2 as u32)
            {
                finish_call::<IOVECS>(pid_tgid, &rec, ret);
            }
            return 0;
        }
        arch::ACCEPT | arch::ACCEPT4 | arch::CONNECT => {
            // SAFETY: the context is this program's own; on success control does not return.
            unsafe { CONN_EXIT.tail_call(&ctx, 0) };
            return 0;
        }
        // openat(dirfd, path, flags, mode), open(path, flags, mode), creat(path, mode): a
        // log file may be opened (`logs.files`).
        arch::OPENAT => {
            crate::logs::on_open(tgid, pid_tgid as u32, ret, a1, a2);
            return 0;
        }
        nr if Some(nr) == arch::OPEN => {
            crate::logs::on_open(tgid, pid_tgid as u32, ret, a0, a1);
            return 0;
        }
        nr if Some(nr) == arch::CREAT => {
            crate::logs::on_open(tgid, pid_tgid as u32, ret, a0, crate::logs::CREAT_FLAGS);
            return 0;
        }
        _ => return 0,
    };
    // A call that moved nothing emits nothing, but inside a TLS call it still tells which
    // socket the session uses.
    if ret <= 0 && traced_flags & TRACED_FLAG_TLS == 0 {
        return 0;
    }
    if let Some(rec) = data_call(tgid, pid_tgid, traced_flags, call, a0 as u32, a1, a2) {
        finish_call::<IOVECS>(pid_tgid, &rec, ret);
    }
    0
}

/// The exit of accept, accept4 and connect (tail-called from the exit program, so the same
/// context). accept(fd, addr, addrlen) is all in the registers; connect's socket was saved by
/// its enter.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_conn(ctx: RawTracePointContext) -> u32 {
    let Some((_, _, pid_tgid, _)) = traced_current_flags() else { return 0 };
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let Some((nr, [a0, a1, _])) = arch::syscall(regs) else { return 0 };
    let rec = match nr {
        arch::CONNECT => take_inflight(pid_tgid),
        arch::ACCEPT | arch::ACCEPT4 => {
            Some(Inflight { call: Call::Accept, fd: a0 as u32, ptr: a1, len: 0, role: 0, _pad: 0 })
        }
        _ => None,
    };
    if let Some(rec) = rec {
        finish_conn_call(pid_tgid, &rec, ret);
    }
    0
}
