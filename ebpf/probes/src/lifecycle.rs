//! Process lifecycle: children of traced processes are traced from their first syscall; exec and
//! listen are reported so discovery can re-check its selectors at once instead of polling.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use sonde_common::{EventKind, ParentInfo, ProcEvent};

use crate::maps::{
    HAS_CHILDREN, INFLIGHT, LAST_READ_FD, PARENTS, TRACED_PIDS, header, settings, submit, submit_now, traced_current,
    traced_current_flags,
};

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// A new thread shares its process's everything: not a child to trace or announce.
const CLONE_THREAD: u64 = 0x0001_0000;
/// The child gets its own network namespace (its loopback is not its parent's).
const CLONE_NEWNET: u64 = 0x4000_0000;

/// Runs in the parent while it creates a task, before the task can run: a child process is added
/// to the filter before it can make a syscall. Threads (CLONE_THREAD) are skipped: they are
/// traced through their process, and counting them as children would make the kernel keep
/// closed sockets of every thread-per-connection server.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid, _, parent_flags)) = traced_current_flags() else { return 0 };
    let Some(s) = settings() else { return 0 };
    // The field offsets differ across kernel versions; the agent reads them from tracefs.
    // SAFETY: offsets taken from this kernel's format file.
    let Ok(clone_flags) = (unsafe { ctx.read_at::<u64>(s.new_task_clone_flags_offset as usize) }) else { return 0 };
    if clone_flags & CLONE_THREAD != 0 {
        return 0;
    }
    // SAFETY: as above.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(s.new_task_pid_offset as usize) }) else { return 0 };
    if child == s.self_pid {
        return 0;
    }
    // The child has its parent's image, so its parent's flags (TLS library included).
    let flags = parent_flags | sonde_common::TRACED_FLAG_TRACED;
    crate::maps::set_traced_flags(child, flags);
    let _ = TRACED_PIDS.insert(&child, &flags, 0);
    // SAFETY: helper with no arguments.
    let fork_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let _ = PARENTS.insert(&child, &ParentInfo { parent: tgid, _pad: 0, fork_ns }, 0);
    let _ = HAS_CHILDREN.insert(&tgid, &1, 0);
    let new_netns = if clone_flags & CLONE_NEWNET != 0 { sonde_common::PROC_FLAG_NEW_NETNS } else { 0 };
    submit_now(&ProcEvent { header: header(EventKind::ProcFork, tgid, tid), other_pid: child, flags: new_netns });
    0
}

/// Any process: discovery decides whether the new image matches a selector.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    let event = ProcEvent { header: header(EventKind::ProcExec, tgid, tid), other_pid: 0, flags: 0 };
    // A traced process's new image may need TLS probes before it gets far: user space is woken
    // at once. Any other exec is only matched against the selectors and waits for the next
    // poll: waking for every exec on the host cost sonde about 0.1 ms of CPU per exec.
    if traced_current().is_some() {
        submit_now(&event);
    } else {
        submit(&event);
    }
    0
}

/// Drops what the kernel kept for an exiting task (per-thread records; per-process entries when
/// the process itself exits).
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    let _ = PARENTS.remove(&tid);
    let pid_tgid = ((tgid as u64) << 32) | tid as u64;
    let _ = INFLIGHT.remove(&pid_tgid);
    let _ = LAST_READ_FD.remove(&pid_tgid);
    let _ = crate::tls::TLS_CALLS.remove(&pid_tgid);
    let _ = crate::inject::THREAD_CONTEXT.remove(&pid_tgid);
    let _ = crate::inject::SERVER_IO.remove(&pid_tgid);
    if tid == tgid {
        let _ = HAS_CHILDREN.remove(&tgid);
        // Any process: a pid is reused, and its next owner starts untraced.
        crate::maps::clear_traced_flags(tgid);
    }
    if TRACED_PIDS.remove(&tid).is_ok() && tid == tgid {
        submit(&ProcEvent { header: header(EventKind::ProcExit, tgid, tid), other_pid: 0, flags: 0 });
    }
    0
}

/// Any process that starts listening: discovery re-checks `open_ports` selectors for it.
#[tracepoint]
pub fn sys_exit_listen(ctx: TracePointContext) -> u32 {
    // SAFETY: syscall exit records hold the return value at offset 16.
    let ok = unsafe { ctx.read_at::<i64>(16) }.map(|r| r == 0).unwrap_or(false);
    if ok {
        let (tgid, tid) = current_ids();
        submit_now(&ProcEvent { header: header(EventKind::Listen, tgid, tid), other_pid: 0, flags: 0 });
    }
    0
}

const PROT_EXEC: u64 = 4;

/// mmap(addr, len, prot, flags, fd, off) of a file with PROT_EXEC by a traced process: a library
/// is being loaded (at start or by dlopen). Rare, so each one is reported.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid, _)) = traced_current() else { return 0 };
    // SAFETY: syscall enter records hold six 8-byte argument slots from offset 16.
    let prot = unsafe { ctx.read_at::<u64>(16 + 8 * 2) }.unwrap_or(0);
    let fd = unsafe { ctx.read_at::<i64>(16 + 8 * 4) }.unwrap_or(-1);
    if prot & PROT_EXEC != 0 && fd >= 0 {
        submit_now(&ProcEvent { header: header(EventKind::ExecMapping, tgid, tid), other_pid: fd as u32, flags: 0 });
    }
    0
}
