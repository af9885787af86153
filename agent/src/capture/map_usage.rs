//! How full the kernel's per-process and per-connection maps are. Counted by walking each map's
//! keys (BPF_MAP_GET_NEXT_KEY), for the self-metrics that show an operator (and the churn test)
//! that kernel state returns to baseline when processes and connections go away.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapFd},
};

/// Maps whose entries belong to processes, threads or connections (i.e. could leak).
const WATCHED: &[(&str, &str)] = &[
    ("TRACED_PIDS", "traced_pids"),
    ("SOCKETS", "sockets"),
    ("SOCKET_HISTORY", "socket_history"),
    ("PARENTS", "parents"),
    ("HAS_CHILDREN", "has_children"),
    ("INFLIGHT", "inflight"),
    ("LAST_READ_FD", "last_read_fd"),
    ("TLS_CALLS", "tls_calls"),
    ("HANDSHAKES", "tls_handshakes"),
    ("SESSIONS", "tls_sessions"),
];

/// One map's fill level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

struct Watched {
    name: &'static str,
    fd: MapFd,
    key_size: usize,
    capacity: u32,
}

pub struct MapUsage {
    maps: Vec<Watched>,
}

impl MapUsage {
    /// Must run before maps are taken out of `ebpf`.
    pub fn new(ebpf: &Ebpf) -> Self {
        let maps = WATCHED
            .iter()
            .filter_map(|(object_name, name)| {
                let data: &MapData = match ebpf.map(object_name)? {
                    Map::HashMap(d) | Map::LruHashMap(d) => d,
                    _ => return None,
                };
                let info = data.info().ok()?;
                Some(Watched {
                    name,
                    fd: info.fd().ok()?,
                    key_size: info.key_size() as usize,
                    capacity: info.max_entries(),
                })
            })
            .collect();
        Self { maps }
    }

    pub fn fill(&self) -> Vec<MapFill> {
        self.maps
            .iter()
            .map(|m| MapFill {
                name: m.name,
                entries: count_keys(&m.fd, m.key_size, m.capacity),
                capacity: m.capacity.into(),
            })
            .collect()
    }
}

/// bpf(BPF_MAP_GET_NEXT_KEY) arguments (the map-element member of union bpf_attr).
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

fn count_keys(fd: &MapFd, key_size: usize, capacity: u32) -> u64 {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut count = 0u64;
    let mut first = true;
    // Entries can come and go while we walk; never walk more than the map can hold.
    while count <= u64::from(capacity) {
        let attr = NextKeyAttr {
            map_fd: fd.as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: attr points to valid key buffers of the map's key size for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKeyAttr,
                std::mem::size_of::<NextKeyAttr>() as libc::c_uint,
            )
        };
        if rc != 0 {
            break;
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    count
}
