//! The agent's side of TRACED_BITS, the kernel's PID filter: one byte of flags per tgid (traced,
//! and uses OpenSSL), byte `pid % 8` of word `pid / 8`.
//!
//! The map is mmapped so the agent writes exactly one pid's byte, as the kernel's hooks do: a map
//! update from user space would write the whole word back and could erase flags the kernel set in
//! between for a neighbouring pid. (A byte per pid rather than two bits: kernels before 5.12 have
//! no BPF atomic OR/AND, so the kernel side can only store whole bytes.)

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed},
};

use aya::maps::MapData;

use sonde_common::TRACED_FLAG_TRACED;

/// Largest pid Linux can hand out (PID_MAX_LIMIT on 64-bit): a 4 MiB array at most (32 KiB for
/// the common pid_max of 32768).
const PID_MAX_LIMIT: u32 = 1 << 22;
const PIDS_PER_WORD: u32 = 8;

/// Words in the bitmap for this host's pid_max (read at start; pids above it, if pid_max is
/// raised later, are filtered through the TRACED_PIDS hash instead).
pub fn words_for_host() -> u32 {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(PID_MAX_LIMIT)
        .clamp(64, PID_MAX_LIMIT);
    pid_max.div_ceil(PIDS_PER_WORD)
}

pub struct TracedBits {
    words: *const AtomicU64,
    len: usize,
    mapped_bytes: usize,
    // Keeps the map (and so the mapping's backing) alive.
    _map: MapData,
}

// SAFETY: the mapping is only accessed through atomics; the pointer stays valid until drop.
unsafe impl Send for TracedBits {}

impl TracedBits {
    /// Maps the TRACED_BITS array (created with BPF_F_MMAPABLE; its length is the map's).
    pub fn map(map: MapData) -> std::io::Result<Self> {
        let len = map.info().map_err(std::io::Error::other)?.max_entries() as usize;
        let mapped_bytes = (len * 8).div_ceil(4096) * 4096;
        // SAFETY: a shared read-write mapping of the map's value area, as the kernel documents
        // for mmapable arrays; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { words: ptr.cast(), len, mapped_bytes, _map: map })
    }

    /// The byte holding `pid`'s flags.
    fn slot(&self, pid: u32) -> Option<&AtomicU8> {
        let index = (pid / PIDS_PER_WORD) as usize;
        // SAFETY: the word index is checked against the mapped length, the byte is one of its 8.
        (index < self.len).then(|| unsafe { &*self.words.cast::<AtomicU8>().add(pid as usize) })
    }

    /// Marks the pid traced (its TLS flag, if the kernel set it, stays).
    pub fn set(&self, pid: u32) {
        if let Some(flags) = self.slot(pid) {
            flags.fetch_or(TRACED_FLAG_TRACED as u8, Relaxed);
        }
    }

    /// Untraced: every flag cleared.
    pub fn clear(&self, pid: u32) {
        if let Some(flags) = self.slot(pid) {
            flags.store(0, Relaxed);
        }
    }

    /// Processes marked traced: reported with the kernel maps' fill, so a mark left behind by
    /// an exited process shows (the churn test checks it returns to baseline).
    pub fn count(&self) -> u64 {
        const TRACED_FLAG_BITS: u64 = 0x0101_0101_0101_0101;
        // SAFETY: `len` words mapped in `map`.
        (0..self.len)
            .map(|i| u64::from((unsafe { &*self.words.add(i) }.load(Relaxed) & TRACED_FLAG_BITS).count_ones()))
            .sum()
    }

    pub fn capacity(&self) -> u64 {
        self.len as u64 * u64::from(PIDS_PER_WORD)
    }
}

impl Drop for TracedBits {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.words as *mut libc::c_void, self.mapped_bytes) };
    }
}
