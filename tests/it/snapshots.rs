//! What people read: validate and plan output, pinned as snapshots (paths normalised).

use std::path::Path;

use fleetwave::cli::{self, Format};
use fleetwave::diag::Palette;

use super::repo;

fn run(f: impl FnOnce(&mut Vec<u8>) -> anyhow::Result<u8>) -> (u8, String) {
    let mut out = Vec::new();
    let code = f(&mut out).expect("command runs");
    let text = String::from_utf8(out).expect("utf-8 output");
    (code, text.replace(env!("CARGO_MANIFEST_DIR"), "[ROOT]"))
}

fn observed(name: &str) -> std::path::PathBuf {
    repo(&format!("tests/fixtures/observed/{name}"))
}

#[test]
fn validate_reports_every_problem_with_place_and_hint() {
    let (code, text) = run(|o| {
        cli::validate(
            &repo("tests/fixtures/snapshots/many_problems.yaml"),
            Format::Text,
            o,
            Palette::PLAIN,
        )
    });
    assert_eq!(code, 1);
    insta::assert_snapshot!(text);
}

#[test]
fn validate_json_lists_problems_with_positions() {
    let (code, text) = run(|o| {
        cli::validate(
            &repo("tests/fixtures/snapshots/many_problems.yaml"),
            Format::Json,
            o,
            Palette::PLAIN,
        )
    });
    assert_eq!(code, 1);
    insta::assert_snapshot!(text);
}

#[test]
fn validate_accepts_the_lab() {
    let (code, text) = run(|o| cli::validate(&repo("fleet.yaml"), Format::Text, o, Palette::PLAIN));
    assert_eq!(code, 0);
    insta::assert_snapshot!(text);
}

#[test]
fn plan_of_the_lab_with_nothing_known_captures_first() {
    let (code, text) =
        run(|o| cli::plan(&repo("fleet.yaml"), None, Format::Text, o, Palette::PLAIN));
    assert_eq!(code, 1);
    insta::assert_snapshot!(text);
}

#[test]
fn plan_of_the_lab_as_markdown() {
    let (code, text) = run(|o| {
        cli::plan(
            &repo("fleet.yaml"),
            Some(&observed("lab.json")),
            Format::Markdown,
            o,
            Palette::PLAIN,
        )
    });
    assert_eq!(code, 1);
    insta::assert_snapshot!(text);
}

#[test]
fn plan_of_the_lab_as_json() {
    let (code, text) = run(|o| {
        cli::plan(
            &repo("fleet.yaml"),
            Some(&observed("lab.json")),
            Format::Json,
            o,
            Palette::PLAIN,
        )
    });
    assert_eq!(code, 1);
    insta::assert_snapshot!(text);
}

#[test]
fn plan_of_a_converged_lab_is_empty() {
    let (code, text) = run(|o| {
        cli::plan(
            &repo("fleet.yaml"),
            Some(&observed("lab-converged.json")),
            Format::Text,
            o,
            Palette::PLAIN,
        )
    });
    assert_eq!(code, 0);
    insta::assert_snapshot!(text);
}

#[test]
fn plan_of_the_campus() {
    let campus = repo("examples/campus");
    let obs = campus.join("observed.json");
    let obs = obs.exists().then_some(obs);
    let (_, text) = run(|o| {
        cli::plan(
            Path::new(&campus),
            obs.as_deref(),
            Format::Text,
            o,
            Palette::PLAIN,
        )
    });
    insta::assert_snapshot!(text);
}

#[test]
fn indentation_and_syntax_errors_name_the_line_to_fix() {
    let dir = repo("tests/fixtures/invalid");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("yaml_") && n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 12, "{names:?}");
    let mut all = String::new();
    for name in names {
        let (code, text) =
            run(|o| cli::validate(&dir.join(&name), Format::Text, o, Palette::PLAIN));
        assert_eq!(code, 1, "{name}");
        all.push_str(&format!("=== {name}\n{text}\n"));
    }
    insta::assert_snapshot!(all);
}
