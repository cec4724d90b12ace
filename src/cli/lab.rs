//! `fleetwave lab`, `lab down`, `lab power` and the hidden `lab supervise`: argument
//! parsing and the exit code; the work is in [`crate::lab`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::exit;
use crate::lab::{self, LabState};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LabCli {
    #[command(subcommand)]
    pub command: Option<LabCommand>,
    #[command(flatten)]
    pub up: UpArgs,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The fleet: a file, a directory holding fleet.yaml, or a git work tree (its HEAD).
    #[arg(default_value = "fleet.yaml")]
    pub fleet: PathBuf,
    /// Boot this fleet repository's lab site instead (with --rev): a pull request's
    /// change, in VMs, before it is merged.
    #[arg(long, requires = "rev")]
    pub git: Option<String>,
    /// The revision of --git (a commit, branch or tag).
    #[arg(long, requires = "git")]
    pub rev: Option<String>,
    /// Leave the lab running at the end (`fleetwave lab down` removes it).
    #[arg(long)]
    pub keep: bool,
    /// VMs running at once, at most (each takes one core under TCG).
    #[arg(long, default_value_t = 2)]
    pub vms: usize,
    /// The lab's name (namespaces NAME-srv and NAME-lan); default fwlabPID.
    #[arg(long)]
    pub name: Option<String>,
    /// The site whose hosts become VMs (default: `lab`, or the only site).
    #[arg(long)]
    pub site: Option<String>,
    /// The reference machine's disk: a raw disk image file (default: a small Linux
    /// system built here).
    #[arg(long)]
    pub reference_disk: Option<PathBuf>,
    /// What a machine prints on its serial console once booted from its disk (with
    /// --reference-disk; the built disk prints "HOST booted from disk").
    #[arg(long)]
    pub boot_marker: Option<String>,
    /// The netboot build serve hands out; built there if missing.
    #[arg(long, default_value = "/var/lib/fleetwave/netboot")]
    pub files_dir: PathBuf,
    /// Downloaded kernel packages (the netboot build's and the reference disk's).
    #[arg(long, default_value = "/var/cache/fleetwave/netboot")]
    pub cache: PathBuf,
    /// The statically linked agent for a netboot build (default: this program).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Where the lab's files go (default /var/tmp/fleetwave-lab/NAME).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up after this long, e.g. 30m.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Remove a lab left running by --keep: its VMs, server, namespaces and files.
    Down {
        /// The lab (default: the only one running).
        #[arg(long)]
        name: Option<String>,
        /// Keep its directory (disks, consoles, logs).
        #[arg(long)]
        keep_files: bool,
    },
    /// Pull a VM's plug (off: killed, and kept off) or put it back (on: powered on
    /// when the controller wants it).
    Power {
        /// The host, as the fleet names it.
        host: String,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        to: String,
        /// The lab (default: the only one running).
        #[arg(long)]
        name: Option<String>,
    },
    /// Put a file into a host's data partition (the built reference disk's NTFS), the
    /// machine being off: a change on the reference machine, for a new capture.
    Put {
        /// The host whose disk gets the file (the reference machine, usually).
        host: String,
        /// The file to put there.
        file: PathBuf,
        /// Its name in the partition (default: the file's name).
        #[arg(long = "as")]
        as_name: Option<String>,
        /// The lab (default: the only one running).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the labs running.
    Ls,
    /// The lab's supervisor (started by `fleetwave lab`, in the lab's namespace).
    #[command(hide = true)]
    Supervise {
        /// The lab to supervise.
        #[arg(long)]
        name: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::spec::parse_duration(s).map(Duration::from_secs)
}

pub fn lab(cli: LabCli, out: &mut dyn Write) -> Result<u8> {
    match cli.command {
        None => {
            let a = cli.up;
            let args = lab::run::LabArgs {
                fleet: a.fleet,
                git: a.git.zip(a.rev),
                name: a.name,
                keep: a.keep,
                vms: a.vms,
                site: a.site,
                reference_disk: a.reference_disk,
                boot_marker: a.boot_marker,
                files_dir: a.files_dir,
                cache: a.cache,
                agent: a.agent,
                dir: a.dir,
                timeout: a.timeout,
            };
            Ok(lab::run::lab(&args, out)?)
        }
        Some(LabCommand::Down { name, keep_files }) => {
            let state = LabState::load(name.as_deref())?;
            lab::down(&state, keep_files)?;
            writeln!(out, "lab {} removed", state.name)?;
            Ok(exit::OK)
        }
        Some(LabCommand::Power { host, to, name }) => {
            let state = LabState::load(name.as_deref())?;
            lab::power(&state, &host, to == "on")?;
            writeln!(out, "{host}: power {to}")?;
            Ok(exit::OK)
        }
        Some(LabCommand::Put {
            host,
            file,
            as_name,
            name,
        }) => {
            let state = LabState::load(name.as_deref())?;
            let target = match as_name {
                Some(n) => n,
                None => file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| anyhow::anyhow!("{}: not a file name", file.display()))?,
            };
            let bytes = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            lab::put(&state, &host, &target, &bytes)?;
            writeln!(out, "{host}: {target} written into its data partition")?;
            Ok(exit::OK)
        }
        Some(LabCommand::Ls) => {
            for n in LabState::list() {
                writeln!(out, "{n}")?;
            }
            Ok(exit::OK)
        }
        Some(LabCommand::Supervise { name }) => {
            let state = LabState::load(Some(&name))?;
            lab::supervise::supervise(&state, super::stop_flag())?;
            Ok(exit::OK)
        }
    }
}
