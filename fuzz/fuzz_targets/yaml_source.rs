//! The YAML source: a fleet file as the controller reads it from a commit, through the
//! position-keeping YAML reader, the wire types and validation. Whatever the file
//! holds, the answer is a fleet or a list of problems, never a panic.

#![no_main]

use std::path::{Path, PathBuf};

use fleetwave::source::{Tree, load_each};
use libfuzzer_sys::fuzz_target;

/// One file, `fleet.yaml`; includes match nothing.
struct One<'a>(&'a str);

impl Tree for One<'_> {
    fn read(&self, path: &Path) -> Result<String, String> {
        if path == Path::new("fleet.yaml") {
            Ok(self.0.to_string())
        } else {
            Err(format!("{} does not exist", path.display()))
        }
    }

    fn glob(&self, _pattern: &str) -> Result<Vec<PathBuf>, String> {
        Ok(Vec::new())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(loaded) = load_each(
        &One(text),
        Path::new("fleet.yaml"),
        fleetwave::spec::read_file,
    ) else {
        return;
    };
    let (sources, built) = fleetwave::spec::build(loaded);
    if let Err(problems) = built {
        // Rendering points into the text at each problem's line and column.
        for d in &problems {
            let _ = fleetwave::diag::render(d, &sources, fleetwave::diag::Palette::PLAIN);
        }
    }
});
