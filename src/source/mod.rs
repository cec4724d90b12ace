//! Where fleet files come from: a directory on disk or a commit of a git repository,
//! and the YAML node trees read from them with every position kept.

pub mod git;
pub mod signature;
pub mod syntax;
pub mod watch;
pub mod yaml;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use crate::diag::Diagnostic;
// Positions and file texts live with the diagnostics that show them (so `diag` needs
// nothing from here); named here too, where the loader makes them.
pub use crate::diag::{Loc, SourceFile, Sources};
use yaml::{Node, Value};

/// A value with the position it was read from. Wire types use it for every field a
/// later check may need to point at.
#[derive(Debug, Clone)]
pub struct Sp<T> {
    pub value: T,
    pub loc: Loc,
}

impl<T> Sp<T> {
    pub fn new(value: T, loc: Loc) -> Self {
        Sp { value, loc }
    }
}

impl<T> std::ops::Deref for Sp<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Sp<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Sp<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SpVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for SpVisitor<T> {
            type Value = Sp<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value with a position")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Sp<T>, A::Error> {
                let mut loc = None;
                let mut value = None;
                while let Some(key) = map.next_key::<SpField>()? {
                    if key.is_loc {
                        loc = Some(Loc::unpack(map.next_value()?));
                    } else {
                        value = Some(map.next_value()?);
                    }
                }
                match (value, loc) {
                    (Some(value), Some(loc)) => Ok(Sp { value, loc }),
                    _ => Err(de::Error::custom(
                        "internal: spanned value without position",
                    )),
                }
            }
        }
        d.deserialize_struct(
            yaml::SPANNED,
            yaml::SPANNED_FIELDS,
            SpVisitor(std::marker::PhantomData),
        )
    }
}

/// The two keys [`yaml::SPANNED`] hands out, told apart without allocating: this runs
/// for every positioned field of every host.
struct SpField {
    is_loc: bool,
}

impl<'de> Deserialize<'de> for SpField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SpField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field of a positioned value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpField, E> {
                Ok(SpField {
                    is_loc: v == yaml::SPANNED_FIELDS[0],
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<T: schemars::JsonSchema> schemars::JsonSchema for Sp<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
}

/// A tree of files: the working directory or one commit of a repository.
pub trait Tree {
    /// Read a file. `path` is relative to the tree's root, or absolute for a directory tree.
    fn read(&self, path: &Path) -> Result<String, String>;
    /// Files matching a glob pattern, sorted. `pattern` is already joined to the
    /// including file's directory.
    fn glob(&self, pattern: &str) -> Result<Vec<PathBuf>, String>;
}

/// The filesystem.
pub struct DirTree;

impl Tree for DirTree {
    fn read(&self, path: &Path) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }

    fn glob(&self, pattern: &str) -> Result<Vec<PathBuf>, String> {
        let paths = glob::glob(pattern).map_err(|e| format!("invalid glob pattern: {e}"))?;
        let mut out = Vec::new();
        for p in paths {
            let p = p.map_err(|e| format!("cannot read {}: {e}", e.path().display()))?;
            if p.is_file() {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// A parsed file of the fleet.
#[derive(Debug)]
pub struct Document {
    pub file: u32,
    pub root: Node,
}

/// The result of reading a fleet: all files, what was made of each, and problems
/// found so far.
#[derive(Debug)]
pub struct Loaded<D> {
    pub sources: Sources,
    pub documents: Vec<D>,
    pub problems: Vec<Diagnostic>,
}

impl<D> Default for Loaded<D> {
    fn default() -> Self {
        Loaded {
            sources: Sources::default(),
            documents: Vec::new(),
            problems: Vec::new(),
        }
    }
}

/// Above this many bytes in one level of includes, files are parsed on all cores.
const PARALLEL_PARSE_BYTES: usize = 256 * 1024;

/// What reading one file gives: the thing made of it, its `include:` patterns, and
/// problems found on the way.
pub type ReadFile<D> = (D, Vec<Sp<String>>, Vec<Diagnostic>);

/// Read the fleet file at `entry` and every file it includes, recursively, handing
/// each file's text to `each` (text, file index) on the thread that reads it: files of
/// one include level are read in parallel, and a reader need not keep a whole tree (see
/// [`yaml::parse_with`]).
///
/// A missing entry file is an I/O error (`Err`); everything else (syntax errors, includes
/// that match nothing) is a problem reported with its position.
pub fn load_each<D: Send>(
    tree: &dyn Tree,
    entry: &Path,
    each: impl Fn(&str, u32) -> Result<ReadFile<D>, yaml::SyntaxError> + Sync,
) -> Result<Loaded<D>, String> {
    let mut loaded = Loaded::default();
    let text = tree.read(entry)?;
    let mut seen: HashMap<PathBuf, Loc> = HashMap::new();
    seen.insert(normalize_path(entry), Loc::default());
    // Level by level: the files of one level are parsed on all cores, then their
    // includes are read for the next level. A fleet split by room parses in parallel.
    let mut batch = vec![(entry.to_path_buf(), text)];
    while !batch.is_empty() {
        let first = loaded.sources.files.len();
        let mut paths = Vec::with_capacity(batch.len());
        for (path, text) in batch {
            loaded.sources.files.push(SourceFile {
                display: path.display().to_string(),
                text,
            });
            paths.push(path);
        }
        let level: Vec<(u32, &str)> = loaded.sources.files[first..]
            .iter()
            .enumerate()
            .map(|(i, f)| ((first + i) as u32, f.text.as_str()))
            .collect();
        let bytes: usize = level.iter().map(|(_, t)| t.len()).sum();
        let parsed = crate::par::map_chunks_if(bytes > PARALLEL_PARSE_BYTES, &level, |files| {
            files.iter().map(|(file, text)| each(text, *file)).collect()
        });
        let mut next = Vec::new();
        for ((path, parsed), file) in paths.into_iter().zip(parsed).zip(first as u32..) {
            let (made, includes, problems) = match parsed {
                Ok(parts) => parts,
                Err(e) => {
                    let loc = Loc {
                        file,
                        line: e.line.max(1),
                        col: e.col.max(1),
                        len: 1,
                    };
                    let d = match e.hint {
                        Some(h) => Diagnostic::new(e.message, loc).hint(h),
                        None => Diagnostic::new(format!("YAML syntax error: {}", e.message), loc)
                            .hint(
                                "fix the YAML syntax here; nothing else in this file was checked",
                            ),
                    };
                    loaded.problems.push(d);
                    continue;
                }
            };
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            loaded.problems.extend(problems);
            for pattern in includes {
                // The directory is literal text, even if it holds `[` or `*`.
                let joined =
                    Path::new(&glob::Pattern::escape(&dir.to_string_lossy())).join(&pattern.value);
                let matches = match tree.glob(&joined.to_string_lossy()) {
                    Ok(m) => m,
                    Err(e) => {
                        loaded.problems.push(
                            Diagnostic::new(format!("include `{}`: {e}", pattern.value), pattern.loc)
                                .hint("use * for any part of a name, ** for any directories, [abc] for one of a set"),
                        );
                        continue;
                    }
                };
                if matches.is_empty() {
                    loaded.problems.push(
                        Diagnostic::new(
                            format!("include `{}` matches no file", pattern.value),
                            pattern.loc,
                        )
                        .hint(format!(
                            "patterns are relative to the including file's directory ({}); check the spelling or remove the include",
                            if dir.as_os_str().is_empty() { ".".into() } else { dir.display().to_string() }
                        )),
                    );
                }
                for m in matches {
                    let key = normalize_path(&m);
                    if let Some(first) = seen.get(&key) {
                        let shown = key.strip_prefix(normalize_path(&dir)).unwrap_or(&key);
                        let what = if key == normalize_path(entry) {
                            " (it is the entry file)"
                        } else {
                            ""
                        };
                        let mut d = Diagnostic::new(
                            format!("{} is included more than once{what}", shown.display()),
                            pattern.loc,
                        )
                        .hint("include each file once, or its hosts would be defined twice");
                        if first.line > 0 {
                            d = d.note("first included here", *first);
                        }
                        loaded.problems.push(d);
                        continue;
                    }
                    seen.insert(key, pattern.loc);
                    match tree.read(&m) {
                        Ok(text) => next.push((m, text)),
                        Err(e) => loaded.problems.push(Diagnostic::new(
                            format!("include `{}`: {e}", pattern.value),
                            pattern.loc,
                        )),
                    }
                }
            }
            loaded.documents.push(made);
        }
        batch = next;
    }
    Ok(loaded)
}

/// The `include:` list of a document, with positions. Type errors are reported here
/// because the include list must be read before the rest of the fleet.
pub fn include_patterns(root: &Node, problems: &mut Vec<Diagnostic>) -> Vec<Sp<String>> {
    let Value::Map(entries) = &root.value else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        if !matches!(&k.value, Value::Str(s) if s == "include") {
            continue;
        }
        match &v.value {
            Value::Seq(items) => {
                for item in items {
                    match &item.value {
                        Value::Str(s) => out.push(Sp::new(s.clone(), item.loc)),
                        other => problems.push(
                            Diagnostic::new(
                                format!("wrong type: expected a file name or glob pattern, found {}", other.kind()),
                                item.loc,
                            )
                            .hint("write each include as a quoted path or pattern, like \"rooms/*.yaml\""),
                        ),
                    }
                }
            }
            Value::Str(s) => out.push(Sp::new(s.clone(), v.loc)),
            Value::Null => {}
            other => problems.push(
                Diagnostic::new(
                    format!(
                        "wrong type: expected a list of glob patterns, found {}",
                        other.kind()
                    ),
                    v.loc,
                )
                .hint("write `include: [rooms/*.yaml, labs/*.yaml]`"),
            ),
        }
    }
    out
}

/// Lexical normalisation (no filesystem access, so it works for git trees too).
pub(crate) fn normalize_path(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}
