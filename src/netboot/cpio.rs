//! The initramfs archive: cpio in the "newc" format the kernel unpacks, built in memory
//! from a tree of entries so the order (parents first) and the metadata (root-owned,
//! time 0) are the same on every build.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, executable: bool },
    Symlink { target: String },
}

/// Paths (relative, `/`-separated, no leading slash) to entries. Adding a path adds
/// its parent directories.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() {
            return;
        }
        self.parents(path);
        self.nodes.entry(path.to_string()).or_insert(Node::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, executable: bool) {
        let path = path.trim_matches('/');
        self.parents(path);
        self.nodes
            .insert(path.to_string(), Node::File { data, executable });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_matches('/');
        self.parents(path);
        self.nodes.insert(
            path.to_string(),
            Node::Symlink {
                target: target.to_string(),
            },
        );
    }

    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_matches('/'))
    }

    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            self.nodes
                .entry(path[..end].to_string())
                .or_insert(Node::Dir);
            end += 1;
        }
    }

    /// The bytes of all files (what the archive holds before compression).
    pub fn data_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match n {
                Node::File { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Write the archive. In a BTreeMap a directory sorts before everything under it
    /// (a prefix is smaller), which is the order the kernel needs.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        for (ino, (path, node)) in (1u32..).zip(&self.nodes) {
            let (mode, data): (u32, &[u8]) = match node {
                Node::Dir => (0o040755, &[]),
                Node::File { data, executable } => {
                    (if *executable { 0o100755 } else { 0o100644 }, data)
                }
                Node::Symlink { target } => (0o120777, target.as_bytes()),
            };
            let nlink = if matches!(node, Node::Dir) { 2 } else { 1 };
            entry(out, ino, mode, nlink, path, data)?;
        }
        entry(out, 0, 0, 1, "TRAILER!!!", &[])
    }
}

fn entry(
    out: &mut dyn Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let size = u32::try_from(data.len())
        .map_err(|_| io::Error::other(format!("{name}: larger than cpio's 4 GiB limit")))?;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize (with its NUL), check.
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    let mut header = String::from("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + name.len() + 1)?;
    out.write_all(data)?;
    pad(out, data.len())
}

/// Header+name and data are each padded to 4 bytes.
fn pad(out: &mut dyn Write, len: usize) -> io::Result<()> {
    let n = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_entries_are_aligned() {
        let mut t = Tree::default();
        t.file("lib/modules/a.ko", b"abcde".to_vec(), false);
        t.symlink("bin/sh", "busybox");
        t.file("init", b"#!/bin/sh\n".to_vec(), true);
        let mut out = Vec::new();
        t.write(&mut out).expect("write");
        // Walk the archive back: every header at a 4-byte boundary, names in order.
        let mut names = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(at % 4, 0);
            assert_eq!(&out[at..at + 6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&out[at + 6 + i * 8..at + 14 + i * 8]).expect("hex");
                usize::from_str_radix(s, 16).expect("hex")
            };
            let (size, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&out[at + 110..at + 110 + namesize - 1])
                .expect("name")
                .to_string();
            at += (110 + namesize).div_ceil(4) * 4;
            at += size.div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
            names.push(name);
        }
        assert_eq!(at, out.len());
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/a.ko"
            ]
        );
    }
}
