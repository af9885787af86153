//! What the kernel matrix needs on the host, installed only when missing: QEMU (from
//! bookworm-backports, matching the preinstalled qemu-utils), busybox and kmod, virtme-ng in its
//! own venv, and each matrix kernel unpacked from Debian's packages into a cache (nothing goes to
//! /boot or /lib/modules). Debian suites the host does not list are reached through a private
//! apt source list built from the host's own mirror address.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Survives clean clones, so CI downloads each kernel once per machine.
pub const CACHE: &str = "/var/cache/sonde-kernels";
const VIRTME_NG: &str = "virtme-ng==1.42";
/// Packages the guests need from the host's own suites.
const HOST_PACKAGES: &[&str] = &["busybox-static", "kmod"];

/// A kernel of the matrix: which Debian suite's `linux-image-amd64` it is, and the version it
/// must turn out to be (a suite moving to another kernel line fails loudly, not silently).
pub struct Guest {
    pub suite: &'static str,
    pub series: &'static str,
    /// Runs the injection tests. Under emulation they cost minutes per guest, so they run on one
    /// kernel where injection works (6.1) and where it is refused (6.12, the host); on 5.10
    /// `sonde check` still loads and attaches the injection programs, verifier included.
    pub inject_tests: bool,
}

pub const GUESTS: &[Guest] = &[
    Guest { suite: "bullseye", series: "5.10", inject_tests: false },
    Guest { suite: "bookworm", series: "6.1", inject_tests: true },
    Guest { suite: "bookworm-backports", series: "6.12", inject_tests: true },
];

/// An unpacked kernel: its image, its release string and its build configuration.
pub struct Kernel {
    pub release: String,
    pub inject_tests: bool,
    pub vmlinuz: PathBuf,
    pub config: PathBuf,
}

/// Installs what is missing and returns the guest kernels, oldest first.
pub fn prepare() -> Result<Vec<Kernel>> {
    let apt = PrivateApt::new()?;
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        crate::setup::step("installing qemu-system-x86 from bookworm-backports", || {
            apt.update()?;
            apt.command("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "-t",
                    "bookworm-backports",
                    "qemu-system-x86",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status_ok()
        })?;
    }
    crate::setup::apt_install(HOST_PACKAGES)?;
    let venv = Path::new(CACHE).join("venv");
    if !venv.join("bin/vng").exists() {
        crate::setup::step(&format!("installing {VIRTME_NG} into {}", venv.display()), || {
            Command::new("python3").arg("-m").arg("venv").arg(&venv).status_ok()?;
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "--disable-pip-version-check", VIRTME_NG])
                .status_ok()
        })?;
    }
    GUESTS.iter().map(|g| kernel(&apt, g)).collect()
}

/// The directory holding `vng` and its helpers (they call each other through PATH).
pub fn venv_bin() -> PathBuf {
    Path::new(CACHE).join("venv/bin")
}

fn kernel(apt: &PrivateApt, guest: &Guest) -> Result<Kernel> {
    let dir = Path::new(CACHE).join("kernels").join(guest.suite);
    if let Some(k) = unpacked(&dir, guest) {
        return Ok(k);
    }
    crate::setup::step(&format!("fetching the {} kernel of Debian {}", guest.series, guest.suite), || {
        apt.update()?;
        let package = apt.kernel_package(guest.suite)?;
        let debs = Path::new(CACHE).join("debs");
        std::fs::create_dir_all(&debs)?;
        apt.command("apt-get").arg("download").arg(&package).current_dir(&debs).status_ok()?;
        let deb = std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
            .with_context(|| format!("apt-get download {package} left no .deb in {}", debs.display()))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir).status_ok()?;
        let release = package.trim_start_matches("linux-image-").to_owned();
        Command::new("depmod").arg("-b").arg(&dir).arg(&release).status_ok()?;
        std::fs::remove_file(&deb)?;
        Ok(())
    })?;
    unpacked(&dir, guest).with_context(|| {
        format!("{}: the unpacked kernel in {} is not a {} kernel", guest.suite, dir.display(), guest.series)
    })
}

/// The kernel unpacked in `dir`, if it is there and of the expected series.
fn unpacked(dir: &Path, guest: &Guest) -> Option<Kernel> {
    let series = guest.series;
    let boot = dir.join("boot");
    let release = std::fs::read_dir(&boot)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_owned))
        .next()?;
    let (major, rest) = release.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if format!("{major}.{minor}") != series || !dir.join("lib/modules").join(&release).join("modules.dep").exists() {
        return None;
    }
    Some(Kernel {
        vmlinuz: boot.join(format!("vmlinuz-{release}")),
        config: boot.join(format!("config-{release}")),
        release,
        inject_tests: guest.inject_tests,
    })
}

/// apt with its own source list and package lists under the cache: the host's configuration is
/// read, never changed.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new() -> Result<Self> {
        let dir = Path::new(CACHE).join("apt");
        std::fs::create_dir_all(dir.join("lists/partial"))?;
        let mirror = host_mirror()?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let sources: String = ["bookworm", "bookworm-backports", "bullseye"]
            .iter()
            .map(|suite| format!("deb [signed-by={keyring}] {mirror} {suite} main\n"))
            .collect();
        std::fs::write(dir.join("sources.list"), sources)?;
        Ok(Self { dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-o")
            .arg(format!("Dir::Etc::sourcelist={}", self.dir.join("sources.list").display()))
            .args(["-o", "Dir::Etc::sourceparts=-", "-o"])
            .arg(format!("Dir::State::lists={}", self.dir.join("lists").display()))
            .args(["-o", "APT::Get::List-Cleanup=0"]);
        cmd
    }

    /// Refreshes the private package lists, at most once per run.
    fn update(&self) -> Result<()> {
        let stamp = self.dir.join("lists/.updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() < 3600));
        if !fresh {
            self.command("apt-get").args(["update", "-qq"]).status_ok()?;
            std::fs::write(stamp, b"")?;
        }
        Ok(())
    }

    /// The versioned image package `linux-image-amd64` of `suite` depends on.
    fn kernel_package(&self, suite: &str) -> Result<String> {
        let madison = self.command("apt-cache").args(["madison", "linux-image-amd64"]).output_text()?;
        let version = madison
            .lines()
            .find(|l| {
                l.split('|').nth(2).is_some_and(|src| src.split_whitespace().nth(1) == Some(&format!("{suite}/main")))
            })
            .and_then(|l| l.split('|').nth(1))
            .map(str::trim)
            .with_context(|| format!("no linux-image-amd64 in {suite}:\n{madison}"))?;
        let show = self.command("apt-cache").args(["show", &format!("linux-image-amd64={version}")]).output_text()?;
        show.lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .and_then(|d| d.split([',', ' ']).find(|p| p.starts_with("linux-image-")))
            .map(str::to_owned)
            .with_context(|| format!("linux-image-amd64={version} names no image package"))
    }
}

/// The Debian mirror this machine uses (deb822 or one-line format), without a host name of ours.
fn host_mirror() -> Result<String> {
    let mut texts = Vec::new();
    for path in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"] {
        if let Ok(t) = std::fs::read_to_string(path) {
            texts.push(t);
        }
    }
    for text in &texts {
        for line in text.lines().map(str::trim) {
            let uri = line.strip_prefix("URIs:").map(str::trim).or_else(|| {
                line.strip_prefix("deb ").and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")))
            });
            if let Some(uri) = uri.and_then(|u| u.split_whitespace().next())
                && !uri.contains("security")
            {
                return Ok(uri.trim_end_matches('/').to_owned());
            }
        }
    }
    bail!("no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list")
}

/// Runs a command to success, or fails naming it.
pub trait StatusOk {
    fn status_ok(&mut self) -> Result<()>;
    fn output_text(&mut self) -> Result<String>;
}

impl StatusOk for Command {
    fn status_ok(&mut self) -> Result<()> {
        crate::run(self)
    }

    fn output_text(&mut self) -> Result<String> {
        let shown = format!("{self:?}");
        let out = self.output().with_context(|| format!("starting {shown}"))?;
        if !out.status.success() {
            bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
