//! fleetwave: declarative, GitOps-style imaging for computer fleets.
//!
//! # Layout
//! The modules follow the data flow, one direction:
//! - [`source`]: reads `fleet.yaml` and its includes from a directory or a git commit
//!   into YAML node trees that keep every position.
//! - [`spec`]: wire types (the YAML's shape) and the validated desired state
//!   ([`spec::FleetSpec`]) built from them. Pure.
//! - [`observed`]: what is known of the machines and images (for now read from a JSON file).
//! - [`plan`]: `diff(desired, observed) -> Plan`, the steps per host grouped in waves,
//!   and the comparison of two commits for review. Pure.
//! - [`agent`]: the imaging agent's inventory and disk choice.
//! - [`image`]: the content-addressed image store; capture, deploy and verify of disks.
//! - [`multicast`]: multicast sessions: the sender and the receiver of a deploy to
//!   many machines at once.
//! - [`netboot`]: the environment PXE-booted machines run (kernel, initramfs with the
//!   agent), built from Debian's packages.
//! - [`lab`]: `fleetwave lab`: the fleet's lab site in QEMU VMs on one machine, through
//!   `serve --source`, with a reference disk the project builds.
//! - [`services`]: the network services a site runs: DHCP, TFTP, HTTP boot and the
//!   agent API.
//! - [`state`]: the server's durable state (leases, observations) in SQLite.
//! - [`metrics`]: the process's Prometheus counters (served by `services::metrics`).
//! - [`tls`]: the API over HTTPS (rustls): the server's certificate, its pin, and the
//!   clients' connector that checks a pin or the system's roots.
//! - [`diag`]: problems with their place, rendered with the source line and a hint.
//! - [`cli`]: the `fleetwave` command's glue and output formats.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod diag;
pub mod image;
pub mod lab;
pub mod metrics;
pub mod multicast;
pub mod netboot;
pub mod observed;
pub mod par;
pub mod plan;
pub mod protocol;
pub mod reconcile;
pub mod server;
pub mod services;
pub mod source;
pub mod spec;
pub mod state;
pub mod tls;

/// Test data for the unit tests.
#[cfg(test)]
pub(crate) mod testdata {
    /// A xorshift generator: repeatable noise, no dependency.
    pub fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// `n` bytes of repeatable noise.
    pub fn noise(n: usize) -> Vec<u8> {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        (0..n).map(|_| next() as u8).collect()
    }
}
