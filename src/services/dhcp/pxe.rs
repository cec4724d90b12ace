//! Telling network-boot clients apart and choosing what each one boots.
//!
//! Firmware states its architecture in option 93 (RFC 4578, IANA "Processor
//! Architecture Types") and in the vendor class (option 60, `PXEClient:Arch:00007:...`
//! or `HTTPClient:Arch:00016:...`). iPXE adds the user class `iPXE` (option 77).
//! Firmware that is not iPXE gets an iPXE binary (TFTP, or a URL for UEFI HTTP boot);
//! iPXE gets the URL of its host's script.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::spec::Mac;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    Bios,
    EfiIa32,
    EfiX64,
    EfiArm32,
    EfiArm64,
    HttpX64,
    HttpArm64,
    Other(u16),
}

impl Arch {
    /// From an IANA processor architecture type.
    pub fn from_code(code: u16) -> Arch {
        match code {
            0 => Arch::Bios,
            6 => Arch::EfiIa32,
            7 | 9 => Arch::EfiX64,
            10 => Arch::EfiArm32,
            11 => Arch::EfiArm64,
            16 => Arch::HttpX64,
            19 => Arch::HttpArm64,
            n => Arch::Other(n),
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Arch::HttpX64 | Arch::HttpArm64)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Arch::Bios => f.write_str("bios"),
            Arch::EfiIa32 => f.write_str("efi-ia32"),
            Arch::EfiX64 => f.write_str("efi-x64"),
            Arch::EfiArm32 => f.write_str("efi-arm32"),
            Arch::EfiArm64 => f.write_str("efi-arm64"),
            Arch::HttpX64 => f.write_str("http-x64"),
            Arch::HttpArm64 => f.write_str("http-arm64"),
            Arch::Other(n) => write!(f, "arch-{n}"),
        }
    }
}

/// What a client said about how it boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// `None` for a client that is not network booting (an OS's DHCP client).
    pub arch: Option<Arch>,
    /// The vendor class starts with `PXEClient` (PXE firmware, or iPXE).
    pub pxe: bool,
    /// The vendor class starts with `HTTPClient` (UEFI HTTP boot).
    pub http: bool,
    /// iPXE, which fetches its script over HTTP.
    pub ipxe: bool,
}

impl Client {
    /// From options 93, 60 and 77.
    pub fn classify(opt93: Option<u16>, opt60: Option<&[u8]>, opt77: Option<&[u8]>) -> Client {
        let class = opt60.unwrap_or_default();
        let pxe = class.starts_with(b"PXEClient");
        let http = class.starts_with(b"HTTPClient");
        let from_class = (pxe || http)
            .then(|| arch_in_class(class))
            .flatten()
            .map(Arch::from_code);
        let arch = opt93.map(Arch::from_code).or(from_class).or_else(|| {
            // A PXE client that names no architecture is the oldest kind: BIOS.
            pxe.then_some(Arch::Bios)
        });
        Client {
            arch,
            pxe,
            http: http || arch.is_some_and(Arch::is_http),
            ipxe: opt77.is_some_and(is_ipxe_user_class),
        }
    }

    /// For observations.
    pub fn arch_name(&self) -> String {
        match (self.ipxe, self.arch) {
            (true, Some(a)) => format!("ipxe-{a}"),
            (true, None) => "ipxe".into(),
            (false, Some(a)) => a.to_string(),
            (false, None) => "none".into(),
        }
    }
}

/// `PXEClient:Arch:00007:UNDI:003000` → 7.
fn arch_in_class(class: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(class).ok()?;
    let rest = text.split_once(":Arch:")?.1;
    rest.get(..5)?.parse().ok()
}

/// iPXE sends the bare string `iPXE`; RFC 3004 frames each class with its length.
fn is_ipxe_user_class(v: &[u8]) -> bool {
    v == b"iPXE" || v.windows(4).any(|w| w == b"iPXE")
}

/// The iPXE binaries handed to firmware, by architecture: names inside the TFTP root
/// (for UEFI HTTP boot, inside the HTTP server's `/ipxe/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub bios: String,
    pub efi_x64: String,
    pub efi_ia32: String,
    pub efi_arm64: String,
}

impl Default for BootFiles {
    /// The names in Debian's `ipxe` package (`/usr/lib/ipxe`); `snponly.efi` drives
    /// the NIC through the firmware, so it works on any NIC UEFI knows.
    fn default() -> Self {
        BootFiles {
            bios: "undionly.kpxe".into(),
            efi_x64: "snponly.efi".into(),
            efi_ia32: "ipxe-ia32.efi".into(),
            efi_arm64: "snponly-arm64.efi".into(),
        }
    }
}

/// What Secure Boot machines load first: Debian's shim, signed by Microsoft's UEFI CA
/// (served by TFTP from the netboot build; docs/netboot.md). It loads `grubx64.efi`.
pub const SHIM: &str = "shimx64.efi";

/// What a client is told to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Not a network-boot client, or an architecture without a binary.
    Nothing,
    /// A file from the TFTP server at `next_server`.
    Tftp { next_server: Ipv4Addr, file: String },
    /// A URL: UEFI HTTP boot's iPXE binary, or iPXE's script.
    Url { url: String, vendor_class: bool },
}

/// Where the HTTP server is, as clients reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpServer {
    pub address: Ipv4Addr,
    pub port: u16,
}

impl HttpServer {
    pub fn base(&self) -> String {
        if self.port == 80 {
            format!("http://{}", self.address)
        } else {
            format!("http://{}:{}", self.address, self.port)
        }
    }

    pub fn script_url(&self, mac: Mac) -> String {
        format!("{}/boot/{}.ipxe", self.base(), mac)
    }
}

/// Choose what `client` boots.
pub fn choose(
    client: &Client,
    mac: Mac,
    files: &BootFiles,
    http: HttpServer,
    secure_boot: bool,
) -> Boot {
    if client.ipxe {
        return Boot::Url {
            url: http.script_url(mac),
            vendor_class: false,
        };
    }
    let Some(arch) = client.arch else {
        return Boot::Nothing;
    };
    let file = match arch {
        Arch::Bios => &files.bios,
        // iPXE is not signed: with Secure Boot on the firmware refuses it.
        Arch::EfiX64 if secure_boot => SHIM,
        Arch::EfiX64 => &files.efi_x64,
        Arch::EfiIa32 => &files.efi_ia32,
        Arch::EfiArm64 => &files.efi_arm64,
        Arch::HttpX64 => {
            return Boot::Url {
                url: format!("{}/ipxe/{}", http.base(), files.efi_x64),
                vendor_class: true,
            };
        }
        Arch::HttpArm64 => {
            return Boot::Url {
                url: format!("{}/ipxe/{}", http.base(), files.efi_arm64),
                vendor_class: true,
            };
        }
        Arch::EfiArm32 | Arch::Other(_) => return Boot::Nothing,
    };
    Boot::Tftp {
        next_server: http.address,
        file: file.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x52, 0x54, 0, 0x28, 0, 0x11]);
    const HTTP: HttpServer = HttpServer {
        address: Ipv4Addr::new(172, 28, 0, 1),
        port: 8080,
    };

    fn boot(opt93: Option<u16>, opt60: Option<&str>, opt77: Option<&str>) -> Boot {
        let c = Client::classify(opt93, opt60.map(str::as_bytes), opt77.map(str::as_bytes));
        choose(&c, MAC, &BootFiles::default(), HTTP, false)
    }

    fn tftp(file: &str) -> Boot {
        Boot::Tftp {
            next_server: HTTP.address,
            file: file.into(),
        }
    }

    #[test]
    fn each_client_kind_gets_its_binary() {
        // What QEMU's clients send (../shared/TESTING.md).
        let bios = "PXEClient:Arch:00000:UNDI:002001";
        let efi = "PXEClient:Arch:00007:UNDI:003000";
        assert_eq!(boot(Some(0), Some(bios), None), tftp("undionly.kpxe"));
        assert_eq!(boot(Some(7), Some(efi), None), tftp("snponly.efi"));
        assert_eq!(boot(None, Some(efi), None), tftp("snponly.efi"));
        assert_eq!(
            boot(Some(11), Some("PXEClient"), None),
            tftp("snponly-arm64.efi")
        );
        assert_eq!(
            boot(Some(16), Some("HTTPClient:Arch:00016:UNDI:003001"), None),
            Boot::Url {
                url: "http://172.28.0.1:8080/ipxe/snponly.efi".into(),
                vendor_class: true
            }
        );
        let script = Boot::Url {
            url: "http://172.28.0.1:8080/boot/52:54:00:28:00:11.ipxe".into(),
            vendor_class: false,
        };
        assert_eq!(boot(Some(0), Some(bios), Some("iPXE")), script);
        assert_eq!(boot(Some(7), Some(efi), Some("\x04iPXE")), script);
        // An operating system's DHCP client boots nothing.
        assert_eq!(boot(None, Some("udhcp 1.35.0"), None), Boot::Nothing);
        assert_eq!(boot(None, None, None), Boot::Nothing);
    }

    #[test]
    fn a_secure_boot_site_gives_uefi_firmware_the_signed_shim_and_bios_ipxe() {
        let efi = Client::classify(Some(7), Some(b"PXEClient:Arch:00007:UNDI:003000"), None);
        let bios = Client::classify(Some(0), Some(b"PXEClient:Arch:00000:UNDI:002001"), None);
        let files = BootFiles::default();
        assert_eq!(choose(&efi, MAC, &files, HTTP, true), tftp("shimx64.efi"));
        assert_eq!(
            choose(&bios, MAC, &files, HTTP, true),
            tftp("undionly.kpxe")
        );
    }
}
