//! The Debian package, built with cargo-deb from the static release binary, installed
//! on this machine, checked from its installed files, and purged.

use std::path::Path;
use std::process::Command;

use crate::{skipped, tool};

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Purges the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "fleetwave"]).output();
    }
}

#[test]
fn the_package_installs_verifies_and_purges_cleanly() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("installing a package needs root");
        }
        skipped("installing a package needs root".into());
        return;
    }
    let has_cargo_deb = Command::new(env!("CARGO"))
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("cargo-deb is missing; .ci/run installs it");
        }
        skipped("cargo-deb is not installed: cargo install cargo-deb --locked".into());
        return;
    }
    if !tool("systemd", "/usr/bin/systemd-analyze") || !tool("dpkg", "/usr/bin/dpkg") {
        return;
    }
    let (installed, _) = run(Command::new("dpkg").args(["-s", "fleetwave"]));
    if installed {
        // Someone's own install: leave it alone rather than purge it.
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("a fleetwave package is installed on the CI machine; purge it first");
        }
        skipped("a fleetwave package is already installed here".into());
        return;
    }
    let binary = crate::netboot::static_agent();
    // TARGET/x86_64-unknown-linux-gnu/release/fleetwave: cargo deb finds it there.
    let target = binary
        .ancestors()
        .nth(3)
        .expect("the static build's target directory")
        .to_path_buf();
    let out = tempfile::tempdir().expect("tempdir");
    let (ok, text) = run(Command::new(env!("CARGO"))
        .args([
            "deb",
            "--no-build",
            "--no-strip",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-o",
        ])
        .arg(out.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target));
    assert!(ok, "cargo deb: {text}");
    let deb = std::fs::read_dir(out.path())
        .expect("output")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");

    let guard = Installed;
    let (ok, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i: {text}");
    assert!(!text.contains("Warning"), "{text}");
    // The installed program is the static build the package was made from.
    let (ok, version) = run(Command::new("/usr/bin/fleetwave").arg("--version"));
    assert!(ok && version.starts_with("fleetwave "), "{version}");
    let (_, built) = run(Command::new(&binary).arg("--version"));
    assert_eq!(version, built);
    // The units, as systemd reads them, with the user postinst made.
    let (ok, text) = run(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/fleetwave.service",
        "/lib/systemd/system/fleetwave-netboot.service",
    ]));
    assert!(ok, "systemd-analyze verify: {text}");
    assert!(
        !text.contains("fleetwave"),
        "systemd-analyze verify warns: {text}"
    );
    let (ok, text) = run(Command::new("getent").args(["passwd", "fleetwave"]));
    assert!(ok, "no fleetwave user: {text}");
    // The default configuration is one the installed server reads.
    let (ok, text) = run(Command::new("/usr/bin/fleetwave").args(["schema", "--server"]));
    assert!(ok && text.contains("log_format"), "{text}");
    let shipped = std::fs::read_to_string("/etc/fleetwave/server.yaml").expect("conffile");
    fleetwave::cli::server_config::parse("/etc/fleetwave/server.yaml", &shipped)
        .unwrap_or_else(|e| panic!("the shipped server.yaml does not read:\n{e}"));

    drop(guard);
    for gone in [
        "/usr/bin/fleetwave",
        "/etc/fleetwave",
        "/lib/systemd/system/fleetwave.service",
        "/var/lib/fleetwave",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after purge");
    }
    let (user_left, _) = run(Command::new("getent").args(["passwd", "fleetwave"]));
    assert!(!user_left, "the fleetwave user is left after purge");
}
