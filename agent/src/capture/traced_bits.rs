//! The agent's side of TRACED_BITS, the kernel's one-bit-per-tgid first step of the PID filter.
//!
//! The map is mmapped so a bit is flipped with an atomic read-modify-write on the word the
//! kernel's fork hook also updates atomically: a map update from user space would write the
//! whole word back and could erase a bit the kernel set in between.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use aya::maps::MapData;

/// Largest pid Linux can hand out (PID_MAX_LIMIT on 64-bit): a 512 KiB bitmap.
const PID_MAX_LIMIT: u32 = 1 << 22;

/// Words in the bitmap for this host's pid_max (read at start; pids above it, if pid_max is
/// raised later, skip the bitmap and go to the hash).
pub fn words_for_host() -> u32 {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(PID_MAX_LIMIT)
        .clamp(64, PID_MAX_LIMIT);
    pid_max.div_ceil(64)
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
    /// Maps the TRACED_BITS array (created with BPF_F_MMAPABLE, `words` entries of u64).
    pub fn map(map: MapData, words: u32) -> std::io::Result<Self> {
        let len = words as usize;
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

    fn word(&self, pid: u32) -> Option<&AtomicU64> {
        let index = (pid / 64) as usize;
        // SAFETY: index checked against the mapped length; u64 words are 8-byte aligned.
        (index < self.len).then(|| unsafe { &*self.words.add(index) })
    }

    /// Before the pid enters TRACED_PIDS.
    pub fn set(&self, pid: u32) {
        if let Some(w) = self.word(pid) {
            w.fetch_or(1 << (pid % 64), Relaxed);
        }
    }

    /// After the pid left TRACED_PIDS.
    pub fn clear(&self, pid: u32) {
        if let Some(w) = self.word(pid) {
            w.fetch_and(!(1 << (pid % 64)), Relaxed);
        }
    }

    /// Bits set: reported with the kernel maps' fill, so a bit left behind by an exited
    /// process shows (the churn test checks it returns to baseline).
    pub fn count(&self) -> u64 {
        // SAFETY: `len` words mapped in `map`.
        (0..self.len).map(|i| u64::from(unsafe { &*self.words.add(i) }.load(Relaxed).count_ones())).sum()
    }

    pub fn capacity(&self) -> u64 {
        self.len as u64 * 64
    }
}

impl Drop for TracedBits {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.words as *mut libc::c_void, self.mapped_bytes) };
    }
}
