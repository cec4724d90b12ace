//! Exit codes, as scripts and CI rely on them: the real binary, run as a user would.

use std::process::Command;

use super::repo;

fn fleetwave(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetwave"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_exits_0_valid_1_invalid_2_missing() {
    assert_eq!(
        fleetwave(&["validate"]).0,
        0,
        "the lab fleet.yaml in the working directory"
    );
    let (code, out, _) = fleetwave(&["validate", "tests/fixtures/snapshots/many_problems.yaml"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("tests/fixtures/snapshots/many_problems.yaml:14:47"),
        "relative paths as given: {out}"
    );
    let (code, _, err) = fleetwave(&["validate", "no/such/fleet.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("no/such/fleet.yaml"), "{err}");
    assert_eq!(
        fleetwave(&["validate", "--format", "yaml"]).0,
        2,
        "usage error"
    );
}

#[test]
fn plan_exits_0_converged_1_changes_2_invalid() {
    assert_eq!(
        fleetwave(&[
            "plan",
            "--observed",
            "tests/fixtures/observed/lab-converged.json"
        ])
        .0,
        0
    );
    assert_eq!(
        fleetwave(&["plan", "--observed", "tests/fixtures/observed/lab.json"]).0,
        1
    );
    assert_eq!(
        fleetwave(&["plan", "tests/fixtures/snapshots/many_problems.yaml"]).0,
        2
    );
    let (code, _, err) = fleetwave(&["plan", "--observed", "Cargo.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("Cargo.toml:1:2: expected value"),
        "observed-state errors name the place: {err}"
    );
}

#[test]
fn no_colour_when_not_a_terminal() {
    let (_, out, _) = fleetwave(&["validate", "tests/fixtures/snapshots/many_problems.yaml"]);
    assert!(!out.contains('\x1b'), "escape codes in piped output");
}

/// Regression: these commands created an empty store at a mistyped `--store`, and
/// `image verify` then reported "0 chunks checked, 0 problems" with exit 0.
#[test]
fn image_commands_without_a_store_exit_2_naming_it_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-store");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    for store in [&missing, &empty] {
        let s = store.to_str().expect("utf-8");
        let runs: [&[&str]; 6] = [
            &["image", "ls", "--store", s],
            &["image", "verify", "--store", s],
            &["image", "rm", "win10", "--store", s],
            &["image", "gc", "--store", s],
            &["agent", "verify", "win10", "Cargo.toml", "--store", s],
            &["agent", "deploy", "win10", "Cargo.toml", "--store", s],
        ];
        for args in runs {
            let (code, out, err) = fleetwave(args);
            assert_eq!(code, 2, "{args:?}: {out}{err}");
            assert!(err.contains(&format!("{s} holds no image store")), "{err}");
        }
    }
    assert!(!missing.exists(), "a store was created at {missing:?}");
    let left = std::fs::read_dir(&empty).expect("read").count();
    assert_eq!(left, 0, "files were created in {empty:?}");

    let s = missing.to_str().expect("utf-8");
    let (code, _, err) = fleetwave(&[
        "agent",
        "capture",
        "no/such/disk",
        "--image",
        "x",
        "--store",
        s,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no/such/disk"), "{err}");
    assert!(
        !missing.exists(),
        "capture of a missing disk created {missing:?}"
    );
}

/// Regression: a malformed `--group` was reported as `--multicast`.
#[test]
fn multicast_send_names_group_when_it_is_malformed() {
    let (code, _, err) = fleetwave(&[
        "multicast",
        "send",
        "win10",
        "--group",
        "239.28.0.1",
        "--bind",
        "127.0.0.1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--group \"239.28.0.1\": write the group as ADDRESS:PORT"),
        "{err}"
    );
}

/// Output is buffered: what reaches stdout must still be whole when the process ends,
/// on exit 0, 1 and 2 alike.
#[test]
fn buffered_output_arrives_whole() {
    let (code, out, err) = fleetwave(&["plan", "--format", "json"]);
    assert_eq!(code, 1, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).expect("plan JSON parses");
    assert!(plan["waves"].is_array(), "{plan}");
    let (code, out, _) = fleetwave(&["schema"]);
    assert_eq!(code, 0);
    serde_json::from_str::<serde_json::Value>(&out).expect("schema JSON parses");
    let (code, out, _) = fleetwave(&[
        "validate",
        "--format",
        "json",
        "tests/fixtures/snapshots/many_problems.yaml",
    ]);
    assert_eq!(code, 1);
    serde_json::from_str::<serde_json::Value>(&out).expect("problems JSON parses");
}
