//! The agent's side of TRACED_BITS, the kernel's PID filter: two bits per tgid (traced, and
//! uses OpenSSL), in word `pid / 32` at bit `2 * (pid % 32)`.
//!
//! The map is mmapped so a bit is flipped with an atomic read-modify-write on the word the
//! kernel's fork hook also updates atomically: a map update from user space would write the
//! whole word back and could erase a bit the kernel set in between.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use aya::maps::MapData;

use sonde_common::TRACED_FLAG_TRACED;

/// Largest pid Linux can hand out (PID_MAX_LIMIT on 64-bit): a 1 MiB bitmap.
const PID_MAX_LIMIT: u32 = 1 << 22;
const PIDS_PER_WORD: u32 = 32;

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

    /// The word holding `pid`'s bits, and the shift of its traced bit.
    fn slot(&self, pid: u32) -> Option<(&AtomicU64, u32)> {
        let index = (pid / PIDS_PER_WORD) as usize;
        // SAFETY: index checked against the mapped length; u64 words are 8-byte aligned.
        (index < self.len).then(|| (unsafe { &*self.words.add(index) }, 2 * (pid % PIDS_PER_WORD)))
    }

    /// Marks the pid traced (its TLS bit, if the kernel set it, stays).
    pub fn set(&self, pid: u32) {
        if let Some((w, shift)) = self.slot(pid) {
            w.fetch_or(u64::from(TRACED_FLAG_TRACED) << shift, Relaxed);
        }
    }

    /// Untraced: both bits cleared.
    pub fn clear(&self, pid: u32) {
        if let Some((w, shift)) = self.slot(pid) {
            w.fetch_and(!(3 << shift), Relaxed);
        }
    }

    /// Processes marked traced: reported with the kernel maps' fill, so a mark left behind by
    /// an exited process shows (the churn test checks it returns to baseline).
    pub fn count(&self) -> u64 {
        const TRACED_FLAG_BITS: u64 = 0x5555_5555_5555_5555;
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
