//! The checked-in JSON Schema must be what the wire types generate, and every fleet
//! file must point editors at it.

use super::repo;

#[test]
fn checked_in_schema_is_current() {
    let path = repo("schemas/fleet.schema.json");
    let fresh = fleetwave::cli::schema();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &fresh).expect("schema written");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == fresh,
        "schemas/fleet.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test it schema` and commit it"
    );
}

#[test]
fn checked_in_server_schema_is_current() {
    let path = repo("schemas/server.schema.json");
    let fresh = fleetwave::cli::server_config::schema();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &fresh).expect("schema written");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == fresh,
        "schemas/server.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test it schema` and commit it"
    );
}

#[test]
fn fleet_files_start_with_the_schema_modeline() {
    let mut files = vec![repo("fleet.yaml")];
    for dir in ["examples", "tests/fixtures"] {
        collect(&repo(dir), &mut files);
    }
    assert!(files.len() > 10);
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("# yaml-language-server: $schema="),
            "{} does not start with the yaml-language-server modeline",
            f.display()
        );
        let target = first.trim_start_matches("# yaml-language-server: $schema=");
        if !target.starts_with("http") {
            let resolved = f.parent().expect("has a directory").join(target);
            assert!(
                resolved.exists(),
                "{}: modeline points at {}, which does not exist",
                f.display(),
                resolved.display()
            );
        }
    }
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
}
