//! Finding the TLS library a process uses: OpenSSL's libssl mapped from any path (read through
//! /proc/PID/root so libraries inside containers resolve), or OpenSSL linked statically into the
//! executable (Node.js exports SSL_read/SSL_write). Files are identified by device and inode so
//! each is probed once however many processes map it.

use std::{os::unix::fs::MetadataExt, path::PathBuf};

/// A file that may hold OpenSSL's SSL_* functions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCandidate {
    /// Path usable from sonde's mount namespace (`/proc/PID/root/...`).
    pub path: PathBuf,
    /// The path as the process sees it, for logs.
    pub shown: String,
    /// (device, inode): the identity uprobes attach to.
    pub id: (u64, u64),
    /// The executable itself (static linking) rather than a shared library.
    pub is_executable: bool,
}

impl TlsCandidate {
    /// What traces this file's users, for logs: "OpenSSL /usr/lib/.../libssl.so.3 (SSL_read, ...)".
    pub fn describe(&self, symbols: &[&str]) -> String {
        let kind = if self.is_executable { "OpenSSL linked statically into" } else { "OpenSSL" };
        format!("{kind} {} ({})", self.shown, symbols.join(", "))
    }
}

/// libssl files mapped by `pid`, then its executable (checked for static OpenSSL).
pub fn candidates(pid: u32) -> Vec<TlsCandidate> {
    let mut out = Vec::new();
    if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        for line in maps.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(dev), Some(inode), Some(path)) = (cols.get(3), cols.get(4), cols.get(5)) else { continue };
            let name = path.rsplit('/').next().unwrap_or("");
            if !name.starts_with("libssl.so") {
                continue;
            }
            let Some(id) = parse_dev(dev).zip(inode.parse().ok()) else { continue };
            if out.iter().any(|c: &TlsCandidate| c.id == id) {
                continue;
            }
            out.push(TlsCandidate {
                path: PathBuf::from(format!("/proc/{pid}/root{path}")),
                shown: path.to_string(),
                id,
                is_executable: false,
            });
        }
    }
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    if let Ok(meta) = std::fs::metadata(&exe) {
        let shown = std::fs::read_link(&exe).map(|p| p.display().to_string()).unwrap_or_default();
        out.push(TlsCandidate { path: exe, shown, id: (meta.dev(), meta.ino()), is_executable: true });
    }
    out
}

/// `08:01` (hex major:minor) -> the kernel's dev_t encoding used by stat().
fn parse_dev(s: &str) -> Option<u64> {
    let (major, minor) = s.split_once(':')?;
    let (major, minor) = (u64::from_str_radix(major, 16).ok()?, u64::from_str_radix(minor, 16).ok()?);
    Some(((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12) | ((major & !0xfff) << 32))
}

/// For a process without OpenSSL: a TLS stack sonde recognizes but cannot trace yet.
pub fn unsupported_stack(pid: u32) -> Option<&'static str> {
    let file = std::fs::File::open(format!("/proc/{pid}/exe")).ok()?;
    let [go_buildinfo, go_tls, rustls, boringssl] =
        contains_each(file, &[b"\xff Go buildinf:", b"crypto/tls", b"rustls", b"BoringSSL"]);
    if go_buildinfo && go_tls {
        Some("Go crypto/tls (not supported yet)")
    } else if rustls {
        Some("rustls (not supported yet)")
    } else if boringssl {
        Some("BoringSSL linked statically without exported symbols (not supported yet)")
    } else {
        None
    }
}

/// Executables are read this far at most.
const SCAN_LIMIT: u64 = 64 << 20;
const SCAN_CHUNK: usize = 256 << 10;

/// Which of `needles` occur in the first [`SCAN_LIMIT`] bytes of `file`, read in chunks (an
/// executable can be tens of megabytes: reading it whole would raise sonde's peak memory by as much).
fn contains_each<const N: usize>(file: impl std::io::Read, needles: &[&[u8]; N]) -> [bool; N] {
    use std::io::Read;
    let finders: Vec<memchr::memmem::Finder<'_>> = needles.iter().map(memchr::memmem::Finder::new).collect();
    // Bytes kept from the previous chunk so a needle split across two chunks is still found.
    let overlap = needles.iter().map(|n| n.len()).max().unwrap_or(1).saturating_sub(1);
    let mut found = [false; N];
    let mut buf = vec![0u8; overlap + SCAN_CHUNK];
    let mut kept = 0;
    let mut file = file.take(SCAN_LIMIT);
    loop {
        let n = match file.read(&mut buf[kept..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let window = &buf[..kept + n];
        for (hit, finder) in found.iter_mut().zip(&finders) {
            *hit = *hit || finder.find(window).is_some();
        }
        if found.iter().all(|f| *f) {
            break;
        }
        kept = overlap.min(window.len());
        let start = window.len() - kept;
        buf.copy_within(start..start + kept, 0);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needles_are_found_across_chunk_boundaries() {
        let mut data = vec![b'x'; 3 * SCAN_CHUNK];
        // One needle straddles the first boundary, one sits at the very end.
        data[SCAN_CHUNK - 3..SCAN_CHUNK + 7].copy_from_slice(b"crypto/tls");
        let end = data.len();
        data[end - 6..].copy_from_slice(b"rustls");
        let found = contains_each(&data[..], &[b"crypto/tls", b"rustls", b"BoringSSL"]);
        assert_eq!(found, [true, true, false]);
    }

    #[test]
    fn device_numbers_match_stat() {
        let meta = std::fs::metadata("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let line = maps.lines().find(|l| l.ends_with(exe.to_str().unwrap())).unwrap();
        let dev = line.split_whitespace().nth(3).unwrap();
        assert_eq!(parse_dev(dev), Some(meta.dev()));
    }
}
