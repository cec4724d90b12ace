//! Table-driven validation: every case under tests/fixtures/invalid/ lists the problems
//! it must produce (`# expect: [FILE:]LINE:COL MESSAGE`), and nothing else.

use std::path::{Path, PathBuf};

use fleetwave::cli;
use fleetwave::source::DirTree;

use super::repo;

/// The entry file of each case: `NAME.yaml`, or `NAME/fleet.yaml`.
fn cases(dir: &Path) -> Vec<(String, PathBuf, PathBuf)> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("fixture directory exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if p.is_dir() {
            out.push((name, p.join("fleet.yaml"), p.clone()));
        } else if p.extension().is_some_and(|e| e == "yaml") {
            out.push((name, p.clone(), dir.to_path_buf()));
        }
    }
    out
}

#[derive(Debug)]
struct Expect {
    file: Option<String>,
    line: u32,
    col: u32,
    message: String,
}

fn expectations(text: &str) -> Vec<Expect> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|e| {
            let (pos, message) = e
                .split_once(' ')
                .expect("expectation has a position and a message");
            let parts: Vec<&str> = pos.rsplitn(3, ':').collect();
            let (col, line, file) = match parts.as_slice() {
                [c, l, f] => (c, l, Some(f.to_string())),
                [c, l] => (c, l, None),
                _ => panic!("bad expectation position `{pos}`"),
            };
            Expect {
                file,
                line: line.parse().expect("line number"),
                col: col.parse().expect("column number"),
                message: message.to_string(),
            }
        })
        .collect()
}

#[test]
fn every_invalid_fixture_reports_exactly_its_expected_problems() {
    let all = cases(&repo("tests/fixtures/invalid"));
    assert!(all.len() >= 30, "only {} invalid cases", all.len());
    let mut failures = Vec::new();
    for (name, entry, case_dir) in &all {
        let text = std::fs::read_to_string(entry).expect("fixture readable");
        let expected = expectations(&text);
        if expected.is_empty() {
            failures.push(format!("{name}: no `# expect:` lines"));
            continue;
        }
        let invalid = match cli::load(&DirTree, entry).expect("fixture loads") {
            Ok(_) => {
                failures.push(format!("{name}: validated, but should not"));
                continue;
            }
            Err(invalid) => invalid,
        };
        let mut got: Vec<(String, u32, u32, String)> = invalid
            .problems
            .iter()
            .map(|d| {
                let loc = d.loc.unwrap_or_default();
                let shown = &invalid.sources.files[loc.file as usize].display;
                let rel = Path::new(shown)
                    .strip_prefix(case_dir)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| shown.clone());
                (rel, loc.line, loc.col, d.message.clone())
            })
            .collect();
        let entry_rel = entry
            .strip_prefix(case_dir)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let total = got.len();
        for e in &expected {
            let file = e.file.clone().unwrap_or_else(|| entry_rel.clone());
            match got.iter().position(|(f, l, c, m)| {
                *f == file && *l == e.line && *c == e.col && m.contains(&e.message)
            }) {
                Some(i) => {
                    got.remove(i);
                }
                None => failures.push(format!(
                    "{name}: expected {file}:{}:{} `{}`",
                    e.line, e.col, e.message
                )),
            }
        }
        if total != expected.len() {
            failures.push(format!(
                "{name}: {} problems, {} expected; unexpected: {got:?}",
                total,
                expected.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_valid_fixture_and_example_validates() {
    let mut entries: Vec<PathBuf> = cases(&repo("tests/fixtures/valid"))
        .into_iter()
        .map(|(_, e, _)| e)
        .collect();
    entries.push(repo("fleet.yaml"));
    entries.push(repo("examples/campus/fleet.yaml"));
    assert!(entries.len() >= 8);
    for entry in entries {
        match cli::load(&DirTree, &entry).expect("fixture loads") {
            Ok(_) => {}
            Err(invalid) => {
                let shown: Vec<String> = invalid
                    .problems
                    .iter()
                    .map(|d| {
                        fleetwave::diag::render(
                            d,
                            &invalid.sources,
                            fleetwave::diag::Palette::PLAIN,
                        )
                    })
                    .collect();
                panic!("{} is invalid:\n{}", entry.display(), shown.join("\n"));
            }
        }
    }
}
