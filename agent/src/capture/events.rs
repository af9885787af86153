//! Decoding of ring buffer records into [`Event`]s. Records are read with unaligned loads and
//! checked for length: a short or unknown record is an error, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use sonde_common::{
    ConnEvent, DATA_FLAG_TLS, DATA_FLAG_UNCOPIED, DIR_INGRESS, DataEvent, EventHeader, EventKind, InjectEvent,
    InjectKey, PROC_FLAG_NEW_NETNS, ProcEvent, ROLE_CLIENT, ROLE_SERVER, RawSockaddr,
};

use crate::conn::{Role, table::Direction};

#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    Data {
        pid: u32,
        tid: u32,
        fd: u32,
        ts_ns: u64,
        direction: Direction,
        byte_count: u64,
        payload: &'a [u8],
        /// sendfile/splice: bytes moved, nothing copied.
        uncopied: bool,
        role: Role,
        /// Plaintext from the TLS library boundary.
        tls: bool,
    },
    ConnOpen {
        pid: u32,
        tid: u32,
        fd: u32,
        ts_ns: u64,
        role: Role,
        listen_fd: Option<u32>,
        peer: Option<SocketAddr>,
    },
    /// A connected socket's own address, known once it is established.
    ConnLocal {
        pid: u32,
        fd: u32,
        local: Option<SocketAddr>,
    },
    ConnClose {
        pid: u32,
        fd: u32,
        ts_ns: u64,
    },
    /// A write to a log fd: `stream` is a `LOG_STREAM_*`.
    LogWrite {
        pid: u32,
        tid: u32,
        fd: u32,
        ts_ns: u64,
        stream: u32,
        byte_count: u64,
        payload: &'a [u8],
    },
    /// A file opened write-only while log files are watched; `path` as the process passed it.
    LogOpen {
        pid: u32,
        fd: u32,
        path: &'a [u8],
    },
    ProcFork {
        parent: u32,
        child: u32,
        /// The child has its own network namespace.
        new_netns: bool,
    },
    ProcExec {
        pid: u32,
    },
    ProcExit {
        pid: u32,
    },
    Listen {
        pid: u32,
    },
    /// A library (or other file) mapped executable by a traced process.
    ExecMapping {
        pid: u32,
    },
    /// The kernel wrote a traceparent into the request that starts at stream byte `offset` of
    /// the connection (`reason` INJECTED, with its ids), or gave the connection up (`reason`).
    Inject {
        pid: u32,
        fd: u32,
        reason: u32,
        offset: u64,
        trace_id: [u8; 16],
        span_id: [u8; 8],
        sampled: bool,
        /// The span of the server request the thread served, when the kernel found it current.
        parent_id: Option<[u8; 8]>,
        key: InjectKey,
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its header ({need})")]
    Short { len: usize, need: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short { len: bytes.len(), need });
    }
    // SAFETY: length checked above; T is a plain repr(C) type from sonde-common; unaligned read.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The kernel's mark of its latest lost record when this record was made (0 for a record too
/// short to hold it).
pub fn last_loss(bytes: &[u8]) -> u32 {
    read::<EventHeader>(bytes).map(|h| h.last_loss).unwrap_or(0)
}

pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let header: EventHeader = read(bytes)?;
    let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    let (pid, tid, ts_ns) = (header.pid, header.tid, header.ts_ns);
    Ok(match kind {
        EventKind::Data => {
            let d: DataEvent = read(bytes)?;
            let start = size_of::<DataEvent>();
            let end = (start + d.captured_len as usize).min(bytes.len());
            Event::Data {
                pid,
                tid,
                fd: d.fd,
                ts_ns,
                direction: if d.direction == DIR_INGRESS { Direction::Ingress } else { Direction::Egress },
                byte_count: d.byte_count,
                payload: &bytes[start..end],
                uncopied: d.flags & DATA_FLAG_UNCOPIED != 0,
                role: role_of(d.role),
                tls: d.flags & DATA_FLAG_TLS != 0,
            }
        }
        EventKind::LogWrite | EventKind::LogOpen => {
            let d: DataEvent = read(bytes)?;
            let start = size_of::<DataEvent>();
            let payload = &bytes[start..(start + d.captured_len as usize).min(bytes.len())];
            if kind == EventKind::LogOpen {
                Event::LogOpen { pid, fd: d.fd, path: payload }
            } else {
                Event::LogWrite { pid, tid, fd: d.fd, ts_ns, stream: d.role, byte_count: d.byte_count, payload }
            }
        }
        EventKind::ConnOpen => {
            let c: ConnEvent = read(bytes)?;
            let role = role_of(c.role);
            let listen_fd = (c.listen_fd != u32::MAX).then_some(c.listen_fd);
            Event::ConnOpen { pid, tid, fd: c.fd, ts_ns, role, listen_fd, peer: sockaddr(&c.peer) }
        }
        EventKind::ConnLocal => {
            let c: ConnEvent = read(bytes)?;
            Event::ConnLocal { pid, fd: c.fd, local: sockaddr(&c.local) }
        }
        EventKind::ConnClose => {
            let c: ConnEvent = read(bytes)?;
            Event::ConnClose { pid, fd: c.fd, ts_ns }
        }
        EventKind::ProcFork => {
            let p: ProcEvent = read(bytes)?;
            Event::ProcFork { parent: pid, child: p.other_pid, new_netns: p.flags & PROC_FLAG_NEW_NETNS != 0 }
        }
        EventKind::ProcExec => Event::ProcExec { pid },
        EventKind::ProcExit => Event::ProcExit { pid },
        EventKind::Listen => Event::Listen { pid },
        EventKind::ExecMapping => Event::ExecMapping { pid },
        EventKind::Inject => {
            let e: InjectEvent = read(bytes)?;
            Event::Inject {
                pid,
                fd: e.fd,
                reason: e.reason,
                offset: e.offset,
                trace_id: e.trace_id,
                span_id: e.span_id,
                sampled: e.sampled != 0,
                parent_id: (e.has_parent != 0).then_some(e.parent_id),
                key: e.key,
            }
        }
    })
}

fn role_of(raw: u32) -> Role {
    match raw {
        ROLE_SERVER => Role::Server,
        ROLE_CLIENT => Role::Client,
        _ => Role::Unknown,
    }
}

/// The address in a raw sockaddr, if it is IPv4 or IPv6. IPv4-mapped IPv6 becomes IPv4.
pub fn sockaddr(raw: &RawSockaddr) -> Option<SocketAddr> {
    let port = u16::from_be(raw.port_be);
    let ip = match raw.family {
        2 => IpAddr::V4(Ipv4Addr::new(raw.addr[0], raw.addr[1], raw.addr[2], raw.addr[3])),
        10 => {
            let v6 = Ipv6Addr::from(raw.addr);
            v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn header(kind: EventKind) -> EventHeader {
        EventHeader { kind: kind as u32, pid: 10, tid: 11, last_loss: 0, ts_ns: 99 }
    }

    #[test]
    fn data_record_with_payload() {
        let d = DataEvent {
            header: header(EventKind::Data),
            fd: 4,
            direction: DIR_INGRESS,
            byte_count: 100,
            captured_len: 3,
            flags: 0,
            role: ROLE_SERVER,
            _pad: 0,
        };
        let mut bytes = as_bytes(&d);
        bytes.extend_from_slice(b"GETxxxx");
        let Event::Data { pid, fd, byte_count, payload, direction, .. } = decode(&bytes).unwrap() else { panic!() };
        assert_eq!((pid, fd, byte_count, payload, direction), (10, 4, 100, &b"GET"[..], Direction::Ingress));
    }

    #[test]
    fn conn_open_decodes_addresses() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let c = ConnEvent {
            header: header(EventKind::ConnOpen),
            fd: 7,
            role: ROLE_SERVER,
            listen_fd: 3,
            _pad: 0,
            peer: RawSockaddr { family: 2, port_be: 8080u16.to_be(), addr },
            local: RawSockaddr::EMPTY,
        };
        let bytes = as_bytes(&c);
        let ev = decode(&bytes).unwrap();
        assert_eq!(
            ev,
            Event::ConnOpen {
                pid: 10,
                tid: 11,
                fd: 7,
                ts_ns: 99,
                role: Role::Server,
                listen_fd: Some(3),
                peer: Some("127.0.0.1:8080".parse().unwrap())
            }
        );
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 0, 0, 1]);
        let v6 = RawSockaddr { family: 10, port_be: 80u16.to_be(), addr: mapped };
        assert_eq!(sockaddr(&v6), Some("10.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert!(matches!(decode(&[1, 0, 0]), Err(DecodeError::Short { .. })));
        let mut h = header(EventKind::Data);
        h.kind = 99;
        assert_eq!(decode(&as_bytes(&h)), Err(DecodeError::UnknownKind(99)));
        // A data header cut short.
        let h = header(EventKind::Data);
        assert!(matches!(decode(&as_bytes(&h)), Err(DecodeError::Short { .. })));
    }
}
