//! Reading process facts from /proc: executable, environment, parent, start time, socket fds,
//! and the TCP tables of the process's network namespace.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// TCP states as /proc/net/tcp numbers them.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
}

pub fn list_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

pub fn exe_path(pid: u32) -> Option<String> {
    let link = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let s = link.to_string_lossy();
    Some(s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned())
}

/// The process's arguments (`/proc/PID/cmdline`), empty when unreadable.
pub fn cmdline(pid: u32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

pub fn environ_var(pid: u32, name: &str) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        let rest = kv.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(rest).into_owned())
    })
}

/// (parent pid, thread group id) from /proc/PID/status.
pub fn parent_and_tgid(pid: u32) -> Option<(u32, u32)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u32> { status.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()) };
    Some((field("PPid:")?, field("Tgid:")?))
}

/// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_ticks(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    after.split_whitespace().nth(19).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// (fd, socket inode) of every socket the process has open.
pub fn socket_fds(pid: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: u32 = e.file_name().to_str()?.parse().ok()?;
        let target = fs::read_link(e.path()).ok()?;
        let inode = target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?;
        Some((fd, inode))
    })
    .collect()
}

/// The inode of the socket behind one fd.
pub fn socket_inode(pid: u32, fd: u32) -> Option<u64> {
    let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// TCP sockets of the process's network namespace, by inode.
pub fn tcp_table(pid: u32) -> HashMap<u64, TcpEntry> {
    read_tcp_tables(pid, parse_tcp_table)
}

/// Listening TCP sockets of the process's network namespace: inode -> local port.
pub fn listening_ports(pid: u32) -> HashMap<u64, u16> {
    read_tcp_tables(pid, parse_listening)
}

/// `/proc/PID/net/tcp` and `tcp6` through one parser into one map.
fn read_tcp_tables<V>(pid: u32, parse: fn(&str, &mut HashMap<u64, V>)) -> HashMap<u64, V> {
    let mut out = HashMap::new();
    for file in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            parse(&text, &mut out);
        }
    }
    out
}

/// Like [`parse_tcp_table`], but only LISTEN lines, checked before anything else is parsed.
pub fn parse_listening(text: &str, out: &mut HashMap<u64, u16>) {
    for line in text.lines().skip(1) {
        let mut cols = line.split_whitespace();
        let (Some(local), Some(state)) = (cols.nth(1), cols.nth(1)) else { continue };
        if state != "0A" {
            continue;
        }
        let (Some(addr), Some(inode)) = (parse_addr(local), cols.nth(5).and_then(|i| i.parse::<u64>().ok())) else {
            continue;
        };
        if inode != 0 {
            out.insert(inode, addr.port());
        }
    }
}

pub fn parse_tcp_table(text: &str, out: &mut HashMap<u64, TcpEntry>) {
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let (Some(local), Some(remote), Ok(state), Ok(inode)) =
            (parse_addr(cols[1]), parse_addr(cols[2]), u8::from_str_radix(cols[3], 16), cols[9].parse::<u64>())
        else {
            continue;
        };
        if inode != 0 {
            out.insert(inode, TcpEntry { local, remote, state });
        }
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = s.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let words: Vec<u32> = (0..ip_hex.len() / 8)
        .map(|i| u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [w] => IpAddr::V4(Ipv4Addr::from(w.to_be_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_lines() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 20 4 30 10 -1\n";
        let mut out = HashMap::new();
        parse_tcp_table(text, &mut out);
        assert_eq!(out[&12345].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(out[&12345].state, TCP_LISTEN);
        assert_eq!(out[&12346].remote, "127.0.0.1:50000".parse().unwrap());
        let v6 = "h\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        parse_tcp_table(v6, &mut out);
        assert_eq!(out[&777].local, "[::1]:8080".parse().unwrap());
    }

    #[test]
    fn listening_lines_only() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 20 4 30 10 -1\n   2: 0100007F:1F90 0100007F:C351 06 00000000:00000000 03:00000F9D 00000000     0        0 0 3 0000000000000000\n";
        let mut out = HashMap::new();
        parse_listening(text, &mut out);
        assert_eq!(out, HashMap::from([(12345, 8080)]));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(exe_path(me).is_some());
        assert_eq!(parent_and_tgid(me).map(|(_, tgid)| tgid), Some(me));
        assert!(start_ticks(me) > 0);
    }
}
