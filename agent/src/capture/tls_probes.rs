//! Where the OpenSSL uprobes are attached, and for which processes.
//!
//! A uprobe attached to a library *file* traps in every process that maps it, traced or not: a
//! load generator, curl, any HTTPS client on the host. Each trap costs microseconds even when
//! the eBPF PID filter drops the event (an untraced nginx under wrk lost three quarters of its
//! HTTPS throughput that way). So probes are attached per traced process: the kernel then plants
//! breakpoints in that process only.
//!
//! Exceptions, where a file gets probes for every process instead (and its per-process probes
//! are dropped once those are in place):
//! - a process traced because its parent is (a backend forked by PostgreSQL, a client started by
//!   a traced shell): such a child can call SSL_read before user space has even read the fork
//!   event;
//! - a process selected without listening on a port (a shell, a job runner, a client), or a
//!   traced process's child that runs another program: the programs such processes start are in
//!   the first case and may map any file, so every probed file gets probes for every process;
//! - more than [`MAX_PROCESSES_PER_FILE`] traced processes map the file: each per-process probe is
//!   its own consumer of the kernel's breakpoint, and every hit checks them all;
//! - attaching to one process failed (e.g. out of file descriptors).

use std::collections::{HashMap, HashSet};

use super::{
    Capture,
    loader::{TlsAttachError, TlsLinks, TlsScope},
};
use crate::discovery::{Origin, tls::TlsCandidate};

/// (device, inode) of a probed file.
type FileId = (u64, u64);

/// Why a file gets probes for every process, for the log.
const A_CHILD: &str = "started by a traced process, it may call OpenSSL before sonde could attach to it alone";
const NOT_A_SERVER: &str =
    "a process selected without listening on a port may start programs that call OpenSSL at once";
const CHILD_EXEC: &str = "a traced process's child started another program";

/// Per-process probe sets on one file before it gets one set for every process instead.
const MAX_PROCESSES_PER_FILE: usize = 16;

enum FileProbes {
    /// The file has no OpenSSL symbols.
    NoOpenSsl,
    Probed {
        /// What traces the file's users, for logs: "OpenSSL /usr/lib/.../libssl.so.3 (SSL_read, ...)".
        what: String,
        /// Where the file was last found, to attach to it again.
        path: std::path::PathBuf,
        /// Probes for every process that maps the file.
        wide: Option<TlsLinks>,
        /// Probes for single processes (none once `wide` is set).
        per_process: HashMap<u32, TlsLinks>,
    },
}

#[derive(Default)]
pub struct TlsProbes {
    files: HashMap<FileId, FileProbes>,
    /// Children of traced processes: their files need probes for every process.
    children: HashSet<u32>,
    /// Every file needs probes for every process, and why.
    all_wide: Option<&'static str>,
}

impl TlsProbes {
    /// A process is traced now, for this reason (before its files are probed).
    pub fn on_traced(&mut self, capture: &mut Capture, pid: u32, origin: Origin) {
        match origin {
            Origin::Listener => {}
            Origin::Other => self.need_all_wide(capture, NOT_A_SERVER),
            Origin::Descendant => {
                self.children.insert(pid);
            }
        }
    }

    /// A traced process ran exec.
    pub fn on_exec(&mut self, capture: &mut Capture, pid: u32) {
        if self.children.contains(&pid) {
            self.need_all_wide(capture, CHILD_EXEC);
        }
    }

    /// Every probed file, now and later, gets probes for every process, because of `why`.
    fn need_all_wide(&mut self, capture: &mut Capture, why: &'static str) {
        if self.all_wide.is_some() {
            return;
        }
        self.all_wide = Some(why);
        log::info!("TLS: uprobes now fire in every process that maps a probed library ({why})");
        for probes in self.files.values_mut() {
            let FileProbes::Probed { what, path, wide: wide @ None, per_process } = probes else { continue };
            match capture.attach_tls(path, TlsScope::AllProcesses) {
                Ok(links) => {
                    *wide = Some(links);
                    for (_, single) in per_process.drain() {
                        capture.detach_tls(single);
                    }
                }
                Err(e) => log::warn!("TLS: attaching uprobes for every process to {what} failed: {e}"),
            }
        }
    }

    /// Makes sure `pid`'s calls into `file` are probed. Returns what traces them, or None when
    /// the file has no OpenSSL (or attaching failed, which is logged).
    pub fn ensure(&mut self, capture: &mut Capture, pid: u32, file: &TlsCandidate) -> Option<String> {
        let mut wide_because = self.all_wide.or_else(|| self.children.contains(&pid).then_some(A_CHILD));
        if let Some(FileProbes::Probed { path, .. }) = self.files.get_mut(&file.id)
            && *path != file.path
        {
            // Paths go through /proc/PID/root: keep one of a process that is alive.
            path.clone_from(&file.path);
        }
        match self.files.get(&file.id) {
            Some(FileProbes::NoOpenSsl) => return None,
            Some(FileProbes::Probed { what, wide, per_process, .. }) => {
                if wide.is_some() || (wide_because.is_none() && per_process.contains_key(&pid)) {
                    return Some(what.clone());
                }
                if per_process.len() >= MAX_PROCESSES_PER_FILE {
                    wide_because = Some("more traced processes map the file than get probes of their own");
                }
            }
            None => {}
        }
        let links = match wide_because {
            Some(_) => capture.attach_tls(&file.path, TlsScope::AllProcesses),
            None => match capture.attach_tls(&file.path, TlsScope::Process(pid)) {
                Err(TlsAttachError::Failed(e)) => {
                    log::debug!("TLS: attaching uprobes to {} for pid {pid} alone failed: {e}", file.shown);
                    wide_because = Some("attaching to it alone failed");
                    capture.attach_tls(&file.path, TlsScope::AllProcesses)
                }
                other => other,
            },
        };
        let links = match links {
            Ok(links) => links,
            Err(TlsAttachError::NoOpenSsl) => {
                self.files.entry(file.id).or_insert(FileProbes::NoOpenSsl);
                return None;
            }
            Err(TlsAttachError::Failed(e)) => {
                log::warn!("TLS: attaching uprobes to {} for pid {pid} failed: {e}", file.shown);
                return None;
            }
        };
        let entry = self.files.entry(file.id).or_insert_with(|| {
            let what = file.describe(&links.symbols);
            log::info!("TLS: attached uprobes to {what}");
            FileProbes::Probed { what, path: file.path.clone(), wide: None, per_process: HashMap::new() }
        });
        let FileProbes::Probed { what, wide, per_process, .. } = entry else {
            // Unreachable: a file without OpenSSL does not attach.
            capture.detach_tls(links);
            return None;
        };
        match wide_because {
            Some(why) => {
                *wide = Some(links);
                // Attached before the per-process probes go, so no call is missed in between; a
                // call seen by both is emitted once (the return probe consumes the call record).
                for (_, single) in per_process.drain() {
                    capture.detach_tls(single);
                }
                log::info!("TLS: uprobes on {} now fire in every process that maps it (pid {pid}: {why})", file.shown);
            }
            None => {
                per_process.insert(pid, links);
            }
        }
        Some(what.clone())
    }

    /// Drops an exited process's own probes.
    pub fn forget(&mut self, capture: &mut Capture, pid: u32) {
        self.children.remove(&pid);
        for probes in self.files.values_mut() {
            if let FileProbes::Probed { per_process, .. } = probes
                && let Some(links) = per_process.remove(&pid)
            {
                capture.detach_tls(links);
            }
        }
    }
}
