//! The opt-in traceparent injection: a sockops program on the cgroup v2 root puts the connections
//! traced processes open into a sock hash, and an sk_msg program on that hash writes the header
//! (see `ebpf/probes/src/inject.rs`). Both detach when the agent exits: the sockops link closes
//! with its file descriptor, and the sock hash (with the sk_msg program) goes with the last
//! reference to it, which gives every socket in it back its normal TCP code.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
};
use sonde_common::{InjectKey, ThreadContext, inject_reason};

use super::loader::CaptureError;

/// Why injection is refused on kernels where FIONREAD lies about sockets in a sock hash.
pub const FIONREAD_HAZARD: &str = "this kernel reports 0 bytes to ioctl(FIONREAD) on sockets held in a sock hash (tcp_bpf_ioctl, kernel commit 929e30f93125), which stalls or truncates clients that size reads with it (nginx, Java, .NET); sonde does not inject on such kernels (traces still connect on the same host without injection)";

/// Where sonde mounts cgroup v2 itself when the host has no mount of it.
const OWN_CGROUP2_MOUNT: &str = "/run/sonde/cgroup2";

pub struct Injection {
    socks: SockHash<MapData, InjectKey>,
    thread_contexts: HashMap<MapData, u64, ThreadContext>,
    counts: PerCpuArray<MapData, u64>,
    /// The cgroup v2 root the sockops program is attached to.
    pub cgroup: PathBuf,
}

impl Injection {
    /// Loads the two programs and checks the kernel's FIONREAD (see [`fionread_hazard`]); with
    /// `attach`, attaches them (sockops on the cgroup v2 root, sk_msg on the sock hash).
    pub fn load(ebpf: &mut Ebpf, attach: bool) -> Result<Self, CaptureError> {
        let cgroup = cgroup2_root().map_err(|detail| CaptureError::Inject { detail })?;
        let mut socks: SockHash<MapData, InjectKey> = take_map(ebpf, "INJECT_SOCKS")?;
        let counts = take_map(ebpf, "INJECT_COUNTS")?;
        let thread_contexts = take_map(ebpf, "THREAD_CONTEXT")?;
        program::<SkMsg>(ebpf, "sonde_inject")?.load().map_err(|e| load_err("sonde_inject", &e))?;
        program::<SockOps>(ebpf, "sonde_sockops")?.load().map_err(|e| load_err("sonde_sockops", &e))?;

        // Before any application socket goes into the hash.
        match fionread_hazard(&mut socks) {
            Ok(false) => {}
            Ok(true) => return Err(CaptureError::Inject { detail: FIONREAD_HAZARD.into() }),
            Err(e) => return Err(inject_err("checking FIONREAD on a socket in the sock hash", &e)),
        }
        if attach {
            program::<SkMsg>(ebpf, "sonde_inject")?
                .attach(socks.fd())
                .map_err(|e| inject_err("attaching sonde_inject to INJECT_SOCKS", &e))?;
            let ops = program::<SockOps>(ebpf, "sonde_sockops")?;
            let dir =
                std::fs::File::open(&cgroup).map_err(|e| inject_err(&format!("opening {}", cgroup.display()), &e))?;
            // A bpf_link (kernels >= 5.7, below sonde's floor) always coexists with other
            // programs on the cgroup (a second sonde, Cilium); the mode's flags must be 0 for it.
            ops.attach(&dir, CgroupAttachMode::Single).map_err(|e| {
                let detail = match &e {
                    aya::programs::ProgramError::SyscallError(s) => format!("{}: {}", s.call, s.io_error),
                    other => other.to_string(),
                };
                inject_err(&format!("attaching sonde_sockops to {} (needs CAP_NET_ADMIN)", cgroup.display()), &detail)
            })?;
        }
        Ok(Self { socks, thread_contexts, counts, cgroup })
    }

    /// Takes a connection the kernel gave up out of the sock hash: its socket gets its normal TCP
    /// code back, and nothing of sonde runs on its sends any more.
    pub fn release(&mut self, key: &InjectKey) {
        let _ = self.socks.remove(key);
    }

    /// The server request thread `pid_tgid` serves (see `ThreadContext`).
    pub fn set_thread_context(&mut self, pid_tgid: u64, ctx: ThreadContext) {
        let _ = self.thread_contexts.insert(pid_tgid, ctx, 0);
    }

    /// Counts by `inject_reason`, summed over CPUs.
    pub fn counts(&self) -> [u64; inject_reason::COUNT as usize] {
        let mut out = [0; inject_reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.counts.get(&(i as u32), 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0);
        }
        out
    }
}

fn inject_err(what: &str, e: &dyn std::fmt::Display) -> CaptureError {
    CaptureError::Inject { detail: format!("{what}: {e}") }
}

/// One of the object's maps, taken out of it as its typed handle.
fn take_map<M>(ebpf: &mut Ebpf, name: &str) -> Result<M, CaptureError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| inject_err(name, &"not in the object file"))?;
    M::try_from(map).map_err(|e| inject_err(name, &e))
}

/// One of the object's programs, as its type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| inject_err(name, &"not in the object file"))?;
    prog.try_into().map_err(|e| inject_err(name, &e))
}

fn load_err(program: &str, e: &aya::programs::ProgramError) -> CaptureError {
    CaptureError::ProgramLoad {
        program: program.to_owned(),
        detail: super::verifier_log::describe_load_error(program, e),
    }
}

/// Puts one end of a loopback connection into the sock hash, sends it bytes from the other end,
/// and asks FIONREAD how many are waiting: the kernel's real behaviour, not a version guess.
/// True when it says 0 (the hazard).
fn fionread_hazard(socks: &mut SockHash<MapData, InjectKey>) -> std::io::Result<bool> {
    use std::{
        io::Write,
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    // A key no real connection has (family 0).
    let key = InjectKey {
        family: 0,
        local_port: client.local_addr()?.port() as u32,
        remote_port: 0,
        _pad: 0,
        local: [0; 16],
        remote: [0; 16],
    };
    socks.insert(key, client.as_raw_fd(), 0).map_err(std::io::Error::other)?;
    let mut probe = || -> std::io::Result<i32> {
        server.write_all(b"sonde fionread probe")?;
        let mut pfd = libc::pollfd { fd: client.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: plain syscalls on a socket we own, with valid pointers.
        unsafe {
            if libc::poll(&mut pfd, 1, 2000) != 1 {
                return Err(std::io::Error::other("the probe's bytes did not arrive"));
            }
            let mut n: libc::c_int = 0;
            if libc::ioctl(client.as_raw_fd(), libc::FIONREAD, &mut n) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(n)
        }
    };
    let n = probe();
    let _ = socks.remove(&key);
    Ok(n? == 0)
}

/// The cgroup v2 hierarchy's root: the host's mount (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), else one sonde mounts.
pub fn cgroup2_root() -> Result<PathBuf, String> {
    if let Some(path) = cgroup2_mount() {
        return Ok(path);
    }
    let own = Path::new(OWN_CGROUP2_MOUNT);
    std::fs::create_dir_all(own).map_err(|e| format!("creating {OWN_CGROUP2_MOUNT}: {e}"))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "cgroup2", "none", OWN_CGROUP2_MOUNT])
        .status()
        .map_err(|e| format!("running mount: {e}"))?;
    if !status.success() {
        return Err(format!(
            "no cgroup v2 mount found and `mount -t cgroup2 none {OWN_CGROUP2_MOUNT}` failed; mount cgroup2 (in a container: the host's /sys/fs/cgroup)"
        ));
    }
    Ok(own.to_path_buf())
}

/// The first cgroup2 mount in /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(path))
    })
}
