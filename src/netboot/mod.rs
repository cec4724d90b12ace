//! The netboot environment: what a PXE-booted machine runs. `build` assembles a Debian
//! kernel (its package downloaded and unpacked, never installed), the modules for the
//! machines people image, busybox, the statically linked agent and the tools it shells
//! out to, into `vmlinuz`, `initrd.img` (a zstd-compressed cpio) and `manifest.json`,
//! which `serve` hands out under `/files/`. [`check_files_dir`] tells `serve` at start
//! whether such a build is there.

pub mod cpio;
mod kernel;
pub mod ra;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The kernel modules the initramfs loads, with their dependencies: the one list, the
/// manifest records it. Missing from the kernel is an error, so a renamed driver is
/// noticed at build time, not on a machine that then cannot reach the server.
pub const MODULES: &[&str] = &[
    // NICs: Intel, Realtek, Broadcom, and virtio (with its PCI transport).
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "i40e",
    "r8169",
    "tg3",
    "bnx2",
    "virtio_pci",
    "virtio_net",
    // Disks: SATA (AHCI and legacy IDE mode), NVMe, virtio, SD/eMMC.
    "ahci",
    "ata_piix",
    "sd_mod",
    "nvme",
    "virtio_blk",
    "virtio_scsi",
    "mmc_block",
    "sdhci_pci",
    "sdhci_acpi",
    // Loop devices: growing a filesystem and partclone's block maps go through one.
    "loop",
    // USB keyboards, for the debug shell.
    "xhci_pci",
    "ehci_pci",
    "ohci_pci",
    "uhci_hcd",
    "usbhid",
    "hid_generic",
];

/// Programs the agent runs (src/image/growfs.rs, layout.rs), taken from this machine
/// with their shared libraries when present. Without them deploys still work; growing
/// a filesystem to a larger disk, and the used-block maps of FAT, exFAT, XFS and Btrfs
/// captures, do not (the manifest lists what is missing).
pub const TOOLS: &[&str] = &[
    "losetup",
    "e2fsck",
    "resize2fs",
    "ntfsresize",
    "partclone.fat",
    "partclone.exfat",
    "partclone.xfs",
    "partclone.btrfs",
];

/// Where the build keeps the Secure Boot loaders (`shimx64.efi`, `grubx64.efi`).
pub const SECURE_BOOT_DIR: &str = "secureboot";

/// The size the initramfs should stay under (HookOS needs 180 MB).
pub const TARGET_BYTES: u64 = 40_000_000;

const INIT: &str = include_str!("init.sh");
const UDHCPC: &str = include_str!("udhcpc.sh");

#[derive(Debug, thiserror::Error)]
pub enum NetbootError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> NetbootError + '_ {
    move |source| NetbootError::Io {
        path: path.to_owned(),
        source,
    }
}

type Result<T> = std::result::Result<T, NetbootError>;

/// What a build holds; `manifest.json` beside the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The Debian package the kernel and modules came from.
    pub kernel_package: String,
    pub kernel_version: String,
    /// The list the build asked for ([`MODULES`]).
    pub modules: Vec<String>,
    /// What the initramfs loads, in order (dependencies first), relative to
    /// /lib/modules/KVER.
    pub module_files: Vec<String>,
    /// Asked for but built into this kernel.
    pub builtin: Vec<String>,
    /// The tools included (paths inside the initramfs), and those not found here.
    pub tools: Vec<String>,
    pub tools_missing: Vec<String>,
    /// `fleetwave --version` of the agent inside.
    pub agent_version: String,
    /// `vmlinuz`, `initrd.img` and the Secure Boot loaders: size and SHA-256.
    pub files: BTreeMap<String, FileSum>,
    /// The initramfs before compression.
    pub initrd_uncompressed_bytes: u64,
    /// The signed shim's and GRUB's packages (an older build has none).
    #[serde(default)]
    pub loader_packages: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub sha256: String,
}

pub struct BuildOptions {
    pub out: PathBuf,
    /// Downloaded and unpacked kernel packages, reused by later builds.
    pub cache: PathBuf,
    /// The agent binary, statically linked (it runs with no libraries beside it).
    pub agent: PathBuf,
    /// zstd level of the initramfs.
    pub level: i32,
}

/// Build into `opts.out`, saying what it does on `log`.
pub fn build(opts: &BuildOptions, log: &mut dyn Write) -> Result<Manifest> {
    let say = |log: &mut dyn Write, s: String| {
        let _ = writeln!(log, "{s}");
    };
    std::fs::create_dir_all(&opts.out).map_err(io_at(&opts.out))?;
    std::fs::create_dir_all(&opts.cache).map_err(io_at(&opts.cache))?;
    if !is_static(&opts.agent)? {
        return Err(NetbootError::Invalid(format!(
            "the agent {} is dynamically linked, and the initramfs holds no libraries for it: \
             pass --agent with a static build (docs/netboot.md: `RUSTFLAGS=\"-C \
             target-feature=+crt-static\" cargo build --release --target \
             x86_64-unknown-linux-gnu`)",
            opts.agent.display()
        )));
    }
    let agent_version = run_out(Command::new(&opts.agent).arg("--version"))?
        .trim()
        .to_string();

    let k = kernel::fetch(&opts.cache, log)?;
    say(log, format!("kernel {} from {}", k.version, k.package));
    let mods = kernel::resolve(&k, MODULES)?;

    let mut tree = cpio::Tree::default();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "var/log",
        "lib64",
    ] {
        tree.dir(d);
    }
    tree.file("init", INIT.as_bytes().to_vec(), true);
    tree.file(
        "etc/fleetwave/udhcpc.script",
        UDHCPC.as_bytes().to_vec(),
        true,
    );
    let busybox = find_static_busybox()?;
    tree.file("bin/busybox", read(&busybox)?, true);
    tree.symlink("bin/sh", "busybox");
    tree.file("usr/bin/fleetwave", read(&opts.agent)?, true);
    add_modules(&mut tree, &k, &mods.files)?;
    let mut list = mods.files.join("\n");
    list.push('\n');
    tree.file("etc/fleetwave/modules", list.into_bytes(), false);
    let (tools, tools_missing) = add_tools(&mut tree)?;

    let uncompressed = tree.data_bytes();
    let initrd = opts.out.join("initrd.img");
    let vmlinuz = opts.out.join("vmlinuz");
    // Written beside, then renamed: a running server never hands out half a file.
    let tmp = opts.out.join(".initrd.img.partial");
    {
        let f = std::fs::File::create(&tmp).map_err(io_at(&tmp))?;
        let mut z = zstd::Encoder::new(f, opts.level).map_err(io_at(&tmp))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        z.multithread(threads).map_err(io_at(&tmp))?;
        let mut w = io::BufWriter::new(z);
        tree.write(&mut w).map_err(io_at(&tmp))?;
        let z = w.into_inner().map_err(|e| NetbootError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        z.finish()
            .map_err(io_at(&tmp))?
            .sync_all()
            .map_err(io_at(&tmp))?;
    }
    std::fs::rename(&tmp, &initrd).map_err(io_at(&initrd))?;
    let tmp = opts.out.join(".vmlinuz.partial");
    std::fs::copy(k.vmlinuz(), &tmp).map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, &vmlinuz).map_err(io_at(&vmlinuz))?;

    // Secure Boot: the signed shim and GRUB, served by TFTP (docs/netboot.md).
    let loaders = kernel::loaders(&opts.cache, log)?;
    let sb = opts.out.join(SECURE_BOOT_DIR);
    std::fs::create_dir_all(&sb).map_err(io_at(&sb))?;
    let shim = sb.join("shimx64.efi");
    let grub = sb.join("grubx64.efi");
    for (from, to) in [(&loaders.shim, &shim), (&loaders.grub, &grub)] {
        let tmp = to.with_extension("partial");
        std::fs::copy(from, &tmp).map_err(io_at(&tmp))?;
        std::fs::rename(&tmp, to).map_err(io_at(to))?;
    }
    say(
        log,
        format!("Secure Boot loaders from {}", loaders.packages.join(", ")),
    );

    let mut files = BTreeMap::new();
    for (name, path) in [
        ("vmlinuz", &vmlinuz),
        ("initrd.img", &initrd),
        ("secureboot/shimx64.efi", &shim),
        ("secureboot/grubx64.efi", &grub),
    ] {
        files.insert(name.to_string(), sum(path)?);
    }
    let m = Manifest {
        kernel_package: k.package.clone(),
        kernel_version: k.version.clone(),
        modules: MODULES.iter().map(|s| s.to_string()).collect(),
        module_files: mods.files,
        builtin: mods.builtin,
        tools,
        tools_missing,
        agent_version,
        files,
        initrd_uncompressed_bytes: uncompressed,
        loader_packages: loaders.packages,
    };
    let path = opts.out.join("manifest.json");
    let text = serde_json::to_string_pretty(&m)
        .map_err(|e| NetbootError::Invalid(format!("manifest: {e}")))?;
    let tmp = opts.out.join(".manifest.json.partial");
    std::fs::write(&tmp, text + "\n").map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
    Ok(m)
}

/// Copy the kernel's module `files` under `lib/modules/KVER/`; that directory.
fn add_modules(tree: &mut cpio::Tree, k: &kernel::Kernel, files: &[String]) -> Result<String> {
    let kdir = format!("lib/modules/{}", k.version);
    for f in files {
        tree.file(
            &format!("{kdir}/{f}"),
            read(&k.modules_dir().join(f))?,
            false,
        );
    }
    Ok(kdir)
}

/// A system smaller than the netboot one, for other boots (the lab's reference disk):
/// the kernel's path and version, and a zstd-compressed initramfs holding busybox,
/// `init`, and `modules` with their dependencies listed in load order in
/// `/etc/modules`.
pub struct SmallSystem {
    pub vmlinuz: PathBuf,
    pub kernel_version: String,
    pub initrd: Vec<u8>,
}

/// Build a [`SmallSystem`] from the kernel in `cache` (downloaded there if missing).
pub fn small_system(
    cache: &Path,
    modules: &[&str],
    init: &str,
    log: &mut dyn Write,
) -> Result<SmallSystem> {
    std::fs::create_dir_all(cache).map_err(io_at(cache))?;
    let k = kernel::fetch(cache, log)?;
    let mods = kernel::resolve(&k, modules)?;
    let mut tree = cpio::Tree::default();
    for d in [
        "bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc", "mnt",
    ] {
        tree.dir(d);
    }
    tree.file("init", init.as_bytes().to_vec(), true);
    tree.file("bin/busybox", read(&find_static_busybox()?)?, true);
    tree.symlink("bin/sh", "busybox");
    let kdir = add_modules(&mut tree, &k, &mods.files)?;
    let list: String = mods
        .files
        .iter()
        .map(|f| format!("/{kdir}/{f}\n"))
        .collect();
    tree.file("etc/modules", list.into_bytes(), false);
    let mut cpio = Vec::new();
    tree.write(&mut cpio)
        .map_err(|e| NetbootError::Invalid(format!("initramfs: {e}")))?;
    let initrd = zstd::stream::encode_all(&cpio[..], 9)
        .map_err(|e| NetbootError::Invalid(format!("initramfs compression: {e}")))?;
    Ok(SmallSystem {
        vmlinuz: k.vmlinuz(),
        kernel_version: k.version.clone(),
        initrd,
    })
}

/// How much of the log's end a failure report carries.
pub const LOG_TAIL_BYTES: u64 = 3000;
/// Set by /init to its log: the agent's failure reports carry that log's tail.
pub const LOG_ENV: &str = "FLEETWAVE_NETBOOT_LOG";

/// The tail of the netboot log, for a failure report; `None` outside the netboot
/// environment.
pub fn log_tail() -> Option<String> {
    let path = std::env::var_os(LOG_ENV)?;
    let path = Path::new(&path);
    Some(match tail(path, LOG_TAIL_BYTES) {
        Ok(t) => format!("--- last lines of {} ---\n{t}", path.display()),
        Err(e) => format!("(no log: {}: {e})", path.display()),
    })
}

/// The last `n` bytes of `path`, from a line start, as text.
pub fn tail(path: &Path, n: u64) -> io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(n);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text,
    })
}

/// Whether `dir` holds a netboot build `serve` can hand out: its manifest, and the
/// files it names with their recorded size and SHA-256. The error says what to do.
pub fn check_files_dir(dir: &Path) -> std::result::Result<Manifest, String> {
    let path = dir.join("manifest.json");
    let hint = format!(
        "PXE clients will loop on \"the agent did not boot\"; run `fleetwave netboot build --out {}`",
        dir.display()
    );
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "no netboot build in {}: {}: {e}; {hint}",
            dir.display(),
            path.display()
        )
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a netboot manifest ({e}); {hint}", path.display()))?;
    for name in ["vmlinuz", "initrd.img"] {
        let want = m
            .files
            .get(name)
            .ok_or_else(|| format!("{}: names no {name}; {hint}", path.display()))?;
        let got = sum(&dir.join(name)).map_err(|e| format!("{e}; {hint}"))?;
        if &got != want {
            return Err(format!(
                "{}: {} bytes with SHA-256 {}, but the manifest says {} bytes with {}: \
                 a build was interrupted or the file was replaced; {hint}",
                dir.join(name).display(),
                got.bytes,
                got.sha256,
                want.bytes,
                want.sha256
            ));
        }
    }
    Ok(m)
}

fn sum(path: &Path) -> Result<FileSum> {
    let mut f = std::fs::File::open(path).map_err(io_at(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_at(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(FileSum { bytes, sha256 })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(io_at(path))
}

/// Run `cmd`; its stdout, or an error with its stderr.
fn run_out(cmd: &mut Command) -> Result<String> {
    let command = format!("{:?}", cmd).replace('"', "");
    let out = cmd.output().map_err(|e| NetbootError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetbootError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An ELF file without a program interpreter (PT_INTERP) runs without ld.so and
/// shared libraries.
pub fn is_static(path: &Path) -> Result<bool> {
    let data = read(path)?;
    let bad = || NetbootError::Invalid(format!("{}: not a 64-bit ELF executable", path.display()));
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u64_at = |o: usize| -> Option<usize> {
        let b: [u8; 8] = data.get(o..o + 8)?.try_into().ok()?;
        usize::try_from(u64::from_le_bytes(b)).ok()
    };
    let phoff = u64_at(32).ok_or_else(bad)?;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        // Offsets come from the file: checked, so a damaged header is an error, not a panic.
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(bad)?;
        let kind = data.get(at..at.saturating_add(4)).ok_or_else(bad)?;
        if kind == 3u32.to_le_bytes() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn find_static_busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let p = Path::new(p);
        if p.exists() && is_static(p)? {
            return Ok(p.to_owned());
        }
    }
    Err(NetbootError::Invalid(
        "no statically linked busybox here: apt-get install busybox-static".into(),
    ))
}

/// Add [`TOOLS`] found on this machine, under /usr/sbin, with the shared libraries
/// `ldd` names (at the paths it names, so the loader finds them). The included paths
/// and the names not found.
fn add_tools(tree: &mut cpio::Tree) -> Result<(Vec<String>, Vec<String>)> {
    let (mut found, mut missing) = (Vec::new(), Vec::new());
    for name in TOOLS {
        let Some(path) = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
        else {
            missing.push(name.to_string());
            continue;
        };
        let inside = format!("usr/sbin/{name}");
        tree.file(&inside, read(&path)?, true);
        found.push(format!("/{inside}"));
        if is_static(&path)? {
            continue;
        }
        let ldd = run_out(Command::new("ldd").arg(&path))?;
        for lib in ldd_paths(&ldd) {
            if !tree.contains(&lib) {
                tree.file(&lib, read(Path::new(&lib))?, true);
            }
        }
    }
    Ok((found, missing))
}

/// The absolute paths in `ldd` output: `libx.so => /lib/.../libx.so (0x..)` and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x..)`.
fn ldd_paths(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = l.split_once("=>").map_or(l, |(_, r)| r.trim());
            p.split_whitespace().next().filter(|p| p.starts_with('/'))
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_library_paths_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                    \tlibgone.so => not found\n";
        assert_eq!(
            ldd_paths(text),
            [
                "/lib/x86_64-linux-gnu/libext2fs.so.2",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn a_missing_or_damaged_build_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = check_files_dir(dir.path()).expect_err("empty");
        assert!(e.contains("fleetwave netboot build --out"), "{e}");
        std::fs::write(dir.path().join("vmlinuz"), b"kernel").expect("write");
        std::fs::write(dir.path().join("initrd.img"), b"initrd").expect("write");
        let mut m = Manifest {
            loader_packages: Vec::new(),
            kernel_package: "linux-image-x".into(),
            kernel_version: "x".into(),
            modules: vec![],
            module_files: vec![],
            builtin: vec![],
            tools: vec![],
            tools_missing: vec![],
            agent_version: "fleetwave 0".into(),
            files: BTreeMap::new(),
            initrd_uncompressed_bytes: 0,
        };
        for n in ["vmlinuz", "initrd.img"] {
            m.files
                .insert(n.into(), sum(&dir.path().join(n)).expect("sum"));
        }
        let text = serde_json::to_string(&m).expect("json");
        std::fs::write(dir.path().join("manifest.json"), text).expect("write");
        assert_eq!(check_files_dir(dir.path()), Ok(m));
        std::fs::write(dir.path().join("initrd.img"), b"other").expect("write");
        let e = check_files_dir(dir.path()).expect_err("changed");
        assert!(e.contains("interrupted or the file was replaced"), "{e}");
    }

    #[test]
    fn the_scripts_parse_in_busybox_sh() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            eprintln!("skipping: busybox is not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in [("init", INIT), ("udhcpc", UDHCPC)] {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            let out = Command::new(busybox)
                .args(["sh", "-n"])
                .arg(&p)
                .output()
                .expect("busybox");
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn a_damaged_elf_header_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("bad");
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        h[54] = 56;
        h[56] = 3;
        std::fs::write(&p, &h).expect("write");
        assert!(is_static(&p).is_err());
        std::fs::write(&p, b"#!/bin/sh\n").expect("write");
        assert!(is_static(&p).is_err());
    }

    #[test]
    fn a_test_binary_is_dynamically_linked_unless_built_static() {
        let me = std::env::current_exe().expect("exe");
        // Test binaries are dynamically linked unless built with crt-static.
        let linked_static = cfg!(target_feature = "crt-static");
        assert_eq!(is_static(&me).expect("elf"), linked_static);
    }
}
