//! Where the OpenSSL uprobes are attached, and for which processes.
//!
//! A uprobe attached to a library *file* traps in every process that maps it, traced or not: a
//! load generator, curl, any HTTPS client on the host. Each trap costs microseconds even when
//! the eBPF PID filter drops the event (an untraced nginx under wrk lost three quarters of its
//! HTTPS throughput that way). So probes are attached per traced process: the kernel then plants
//! breakpoints in that process only.
//!
//! The exception is a process traced because its parent is (a backend forked by PostgreSQL, a
//! client started by a traced shell): such a child can call SSL_read before user space has even
//! read the fork event, so a file one of them maps gets probes for every process instead, and
//! the per-process probes on that file are dropped once those are in place.

use std::collections::{HashMap, HashSet};

use super::{
    Capture,
    loader::{TlsAttachError, TlsLinks, TlsScope},
};
use crate::discovery::tls::TlsCandidate;

/// (device, inode) of a probed file.
type FileId = (u64, u64);

enum FileProbes {
    /// The file has no OpenSSL symbols.
    NoOpenSsl,
    Probed {
        /// What traces the file's users, for logs: "OpenSSL /usr/lib/.../libssl.so.3 (SSL_read, ...)".
        what: String,
        /// Probes for every process that maps the file.
        wide: Option<TlsLinks>,
        /// Probes for single processes (none once `wide` is set).
        per_process: HashMap<u32, TlsLinks>,
    },
}

#[derive(Default)]
pub struct TlsProbes {
    files: HashMap<FileId, FileProbes>,
    /// Processes traced because their parent is.
    via_parent: HashSet<u32>,
}

impl TlsProbes {
    /// `pid` is traced because its parent is: its files get probes for every process.
    pub fn mark_via_parent(&mut self, pid: u32) {
        self.via_parent.insert(pid);
    }

    /// Makes sure `pid`'s calls into `file` are probed. Returns what traces them, or None when
    /// the file has no OpenSSL (or attaching failed, which is logged).
    pub fn ensure(&mut self, capture: &mut Capture, pid: u32, file: &TlsCandidate) -> Option<String> {
        let wide_needed = self.via_parent.contains(&pid);
        match self.files.get(&file.id) {
            Some(FileProbes::NoOpenSsl) => return None,
            Some(FileProbes::Probed { what, wide, per_process })
                if wide.is_some() || (!wide_needed && per_process.contains_key(&pid)) =>
            {
                return Some(what.clone());
            }
            _ => {}
        }
        let scope = if wide_needed { TlsScope::AllProcesses } else { TlsScope::Process(pid) };
        let links = match capture.attach_tls(&file.path, scope) {
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
            let kind = if file.is_executable { "OpenSSL linked statically into" } else { "OpenSSL" };
            let what = format!("{kind} {} ({})", file.shown, links.symbols.join(", "));
            log::info!("TLS: attached uprobes to {what}");
            FileProbes::Probed { what, wide: None, per_process: HashMap::new() }
        });
        let FileProbes::Probed { what, wide, per_process } = entry else {
            // Unreachable: a file without OpenSSL does not attach.
            capture.detach_tls(links);
            return None;
        };
        if wide_needed {
            *wide = Some(links);
            // Attached before the per-process probes go, so no call is missed in between; a
            // call seen by both is emitted once (the return probe consumes the call record).
            for (_, single) in per_process.drain() {
                capture.detach_tls(single);
            }
            log::info!(
                "TLS: uprobes on {} now fire in every process that maps it: pid {pid} was started by a traced process and may call OpenSSL before sonde could attach to it alone",
                file.shown
            );
        } else {
            per_process.insert(pid, links);
        }
        Some(what.clone())
    }

    /// Drops an exited process's own probes.
    pub fn forget(&mut self, capture: &mut Capture, pid: u32) {
        self.via_parent.remove(&pid);
        for probes in self.files.values_mut() {
            if let FileProbes::Probed { per_process, .. } = probes
                && let Some(links) = per_process.remove(&pid)
            {
                capture.detach_tls(links);
            }
        }
    }
}
