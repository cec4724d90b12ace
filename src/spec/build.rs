//! From node trees to a [`FleetSpec`], collecting every problem on the way.
//!
//! Two passes: `collect` reads each section entry into its wire type (one entry at a
//! time, so one bad host does not hide the next), then `resolve` checks values and
//! references and builds the domain types. Names whose entry failed to read are kept
//! as "known" so a typo in one host does not cascade into "unknown host" elsewhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};
use std::net::Ipv4Addr;
use std::str::FromStr;

use indexmap::IndexMap;
use ipnet::Ipv4Net;
use petgraph::graph::{DiGraph, NodeIndex};

use super::types::{parse_duration, parse_rate};
use super::wire::{self, SECTIONS, Selector};
use super::*;
use crate::diag::Diagnostic;
use crate::source::yaml::{DeError, Node, SyntaxError, Value, from_node};
use crate::source::{Document, Loaded, Loc, ReadFile, Sources, Sp};

/// One file's entries in wire form: what [`read_file`] makes of a file, on the
/// thread that parsed it (see [`crate::source::load_each`]).
pub struct ReadDocument {
    raw: Raw,
    problems: Vec<Diagnostic>,
}

/// Build the validated fleet from files read by [`read_file`], or every problem found
/// (the loader's included). The source files come back for showing problems against.
pub fn build(loaded: Loaded<ReadDocument>) -> (Sources, Result<FleetSpec, Vec<Diagnostic>>) {
    let Loaded {
        sources,
        documents,
        problems,
    } = loaded;
    let mut cx = Cx { problems };
    let mut raw = Raw::new();
    for doc in documents {
        cx.problems.extend(doc.problems);
        raw.merge(doc.raw, &mut cx);
    }
    let spec = resolve(&raw, &mut cx);
    crate::par::drop_later(raw);
    if cx.problems.is_empty() {
        (sources, Ok(spec))
    } else {
        let mut p = cx.problems;
        p.sort_by_key(Diagnostic::sort_key);
        p.dedup();
        (sources, Err(p))
    }
}

struct Cx {
    problems: Vec<Diagnostic>,
}

impl Cx {
    fn err(&mut self, d: Diagnostic) {
        self.problems.push(d);
    }

    /// Parse a string field, reporting a failure at its position.
    fn parse<T: FromStr<Err = String>>(&mut self, v: &Sp<String>, hint: &str) -> Option<T> {
        match v.value.parse() {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(Diagnostic::new(e, v.loc).hint(hint));
                None
            }
        }
    }

    /// Parse with a standard parser whose errors say little; the message names the field.
    fn std<T: FromStr>(&mut self, v: &Sp<String>, what: &str, hint: &str) -> Option<T> {
        match v.value.parse() {
            Ok(t) => Some(t),
            Err(_) => {
                self.err(
                    Diagnostic::new(format!("invalid {what} `{}`", v.value), v.loc).hint(hint),
                );
                None
            }
        }
    }

    /// Generations count from 1: 0 is what "never done" looks like, so it would never run.
    fn generation(&mut self, g: &Sp<u64>) -> u64 {
        if g.value == 0 {
            self.err(
                Diagnostic::new("generation 0 never runs", g.loc)
                    .hint("generations count from 1; bump the number to ask for the action again"),
            );
        }
        g.value
    }

    fn with<T>(
        &mut self,
        v: &Sp<String>,
        f: fn(&str) -> Result<T, String>,
        hint: &str,
    ) -> Option<T> {
        match f(&v.value) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(Diagnostic::new(e, v.loc).hint(hint));
                None
            }
        }
    }

    /// Report a deserialization error. `entry` names the section entry it happened in
    /// (kind, name, position of the name), for errors about the entry as a whole.
    fn de_error(&mut self, e: DeError, fallback: Loc, entry: Option<(&str, &str, Loc)>) {
        let e = *e.0;
        let mut loc = e.loc.unwrap_or(fallback);
        let mut message = e.message;
        if message.contains("untagged enum FailureBudget") {
            message = "invalid failure budget: expected a count (3) or a share (\"10%\")".into();
        }
        let is_unknown_field = message.starts_with("unknown field");
        if let Some(field) = &e.field {
            if let Some(rest) = message.strip_prefix("wrong type:") {
                message = format!("wrong type for `{field}`:{rest}");
            } else if message.starts_with("invalid value `") {
                message = format!("{message} for `{field}`");
            } else if let Some(rest) = message.strip_prefix("invalid value:") {
                message = format!("invalid `{field}`:{rest}");
            } else if !is_unknown_field
                && !message.starts_with("duplicate key")
                && !message.contains(field.as_str())
            {
                message = format!("`{field}`: {message}");
            }
        }
        if message.starts_with("missing field")
            && let Some((kind, name, name_loc)) = entry
            && loc == fallback
        {
            // About the entry as a whole: name it and point at its name.
            message = format!("{kind} `{name}`: {message}");
            loc = name_loc;
        }
        let mut d = Diagnostic::new(message, loc);
        if let Some((text, at)) = e.note {
            d = d.note(text, at);
        }
        if let Some((word, expected)) = e.unknown {
            d = d.hint(match did_you_mean(&word, &expected) {
                Some(s) => format!("did you mean `{s}`?"),
                None if is_unknown_field => format!("allowed here: {}", expected.join(", ")),
                None => format!("expected one of: {}", expected.join(", ")),
            });
        } else if d.message.contains("missing field") {
            d = d.hint("add the field; docs/fleet-yaml.md lists what each section takes");
        } else if d.message.starts_with("duplicate key") {
            d = d.hint("a key appears once per mapping: remove or merge the repeated one");
        } else if d.message.contains("wrong type") || d.message.contains("wrong number") {
            d = d.hint("docs/fleet-yaml.md shows the expected shape of this field");
        } else if d.message.starts_with("invalid") {
            d = d.hint("docs/fleet-yaml.md lists the accepted values");
        }
        self.err(d);
    }
}

/// The closest accepted name, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One named entry of a section, with the position of its name.
struct Entry<T> {
    loc: Loc,
    /// Boxed: a host's wire form is about a kilobyte, and moving 100,000 of them from
    /// list to list (and doubling those lists as they grow) set the peak memory.
    value: Box<T>,
}

/// Entries of one section: the ones that read well, and the names of the ones that did not.
struct Section<T> {
    kind: &'static str,
    ok: IndexMap<String, Entry<T>, FxBuildHasher>,
    /// Defined but unreadable: references to these are not reported again.
    broken: FxHashSet<String>,
    /// First definition of every name, for duplicate reports.
    seen: FxHashMap<String, Loc>,
}

impl<T> Section<T> {
    fn new(kind: &'static str) -> Self {
        Section {
            kind,
            ok: IndexMap::default(),
            broken: FxHashSet::default(),
            seen: FxHashMap::default(),
        }
    }

    fn merge(&mut self, other: Section<T>, cx: &mut Cx) {
        if self.seen.is_empty() {
            // The common case of one big file: take it whole, nothing to move.
            *self = other;
            return;
        }
        let mut dups: Vec<(&String, &Loc)> = other
            .seen
            .iter()
            .filter(|(n, _)| self.seen.contains_key(*n))
            .collect();
        dups.sort_by_key(|(_, l)| **l);
        for (name, loc) in dups {
            cx.err(
                Diagnostic::new(format!("{} `{name}` is defined twice", self.kind), *loc)
                    .note("first defined here", self.seen[name])
                    .hint(format!("rename one of them or remove the duplicate; {} names are unique across all included files", self.kind)),
            );
        }
        self.ok.reserve(other.ok.len());
        for (name, e) in other.ok {
            if !self.seen.contains_key(&name) {
                self.ok.insert(name, e);
            }
        }
        for name in other.broken {
            if !self.seen.contains_key(&name) {
                self.broken.insert(name);
            }
        }
        for (name, loc) in other.seen {
            self.seen.entry(name).or_insert(loc);
        }
    }

    fn knows(&self, name: &str) -> bool {
        self.ok.contains_key(name) || self.broken.contains(name)
    }

    /// Report a reference to a name this section does not define.
    /// `from` names the referrer; it is only built when there is something to report.
    fn check_ref(&self, cx: &mut Cx, r: &Sp<String>, from: impl FnOnce() -> String) -> bool {
        if self.knows(&r.value) {
            return true;
        }
        let from = from();
        let names: Vec<&str> = self.ok.keys().map(String::as_str).collect();
        let hint = match did_you_mean(&r.value, &names) {
            Some(s) => format!("did you mean `{s}`?"),
            None if names.is_empty() => format!(
                "no {} is defined; add it under `{}:`",
                self.kind,
                section_key(self.kind)
            ),
            None => format!(
                "define it under `{}:` or use one of: {}",
                section_key(self.kind),
                preview(&names)
            ),
        };
        cx.err(
            Diagnostic::new(
                format!("{from} refers to unknown {} `{}`", self.kind, r.value),
                r.loc,
            )
            .hint(hint),
        );
        false
    }
}

fn section_key(kind: &str) -> &'static str {
    match kind {
        "site" => "sites",
        "image" => "images",
        "host" => "hosts",
        "group" => "groups",
        "multicast group" => "multicast",
        _ => "waves",
    }
}

fn preview(names: &[&str]) -> String {
    let mut s = names.iter().take(8).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        s.push_str(", ...");
    }
    s
}

struct Raw {
    sites: Section<wire::Site>,
    images: Section<wire::Image>,
    hosts: Section<wire::Host>,
    groups: Section<wire::Group>,
    multicast: Section<wire::Multicast>,
    waves: Section<wire::Wave>,
    windows: Vec<Sp<String>>,
}

impl Raw {
    fn new() -> Self {
        Raw {
            sites: Section::new("site"),
            images: Section::new("image"),
            hosts: Section::new("host"),
            groups: Section::new("group"),
            multicast: Section::new("multicast group"),
            waves: Section::new("wave"),
            windows: Vec::new(),
        }
    }

    /// Add the entries of a later file; a name defined again is reported there.
    fn merge(&mut self, other: Raw, cx: &mut Cx) {
        self.sites.merge(other.sites, cx);
        self.images.merge(other.images, cx);
        self.hosts.merge(other.hosts, cx);
        self.groups.merge(other.groups, cx);
        self.multicast.merge(other.multicast, cx);
        self.waves.merge(other.waves, cx);
        self.windows.extend(other.windows);
    }
}

/// Section entries read early, by [`read_file`]'s sink, with the position of the
/// section key they came under (a section written twice keeps only its first).
#[derive(Default)]
struct EarlyEntries {
    sites: Vec<(Loc, Early<wire::Site>)>,
    images: Vec<(Loc, Early<wire::Image>)>,
    hosts: Vec<(Loc, Early<wire::Host>)>,
    groups: Vec<(Loc, Early<wire::Group>)>,
    multicast: Vec<(Loc, Early<wire::Multicast>)>,
    waves: Vec<(Loc, Early<wire::Wave>)>,
}

impl EarlyEntries {
    /// The sink of [`crate::source::yaml::parse_with`]: read known sections' entries now.
    fn take(&mut self, section: &Node, key: Node, value: Node) -> Option<(Node, Node)> {
        fn early<T: for<'de> serde::Deserialize<'de>>(
            list: &mut Vec<(Loc, Early<T>)>,
            section: Loc,
            key: Node,
            value: &Node,
        ) {
            list.push((
                section,
                (key, from_node::<T>(value).map(Box::new), value.loc),
            ));
        }
        let at = section.loc;
        if key.scalar_str() == Some("<<") {
            // A merge key: left in the tree, where the mapping merges it on close.
            return Some((key, value));
        }
        match section.scalar_str() {
            Some("sites") => early(&mut self.sites, at, key, &value),
            Some("images") => early(&mut self.images, at, key, &value),
            Some("hosts") => early(&mut self.hosts, at, key, &value),
            Some("groups") => early(&mut self.groups, at, key, &value),
            Some("multicast") => early(&mut self.multicast, at, key, &value),
            Some("waves") => early(&mut self.waves, at, key, &value),
            _ => return Some((key, value)),
        }
        None
    }
}

/// The early entries that came under the section key at `at`.
fn under<T>(list: &mut Vec<(Loc, Early<T>)>, at: Loc) -> Vec<Early<T>> {
    list.extract_if(.., |(l, _)| *l == at)
        .map(|(_, e)| e)
        .collect()
}

/// Read a file: parse it, reading section entries as they complete (on a large file
/// this overlaps with parsing, and the tree of a host never outlives its reading), then
/// the rest of the tree. Runs on the loader's threads, one file each.
pub fn read_file(text: &str, file: u32) -> Result<ReadFile<ReadDocument>, SyntaxError> {
    read_file_split(text, file, SPLIT_HOSTS_BYTES)
}

/// A `hosts:` section larger than this is parsed in two halves, one per core.
const SPLIT_HOSTS_BYTES: usize = 1 << 20;

fn read_file_split(
    text: &str,
    file: u32,
    split_over: usize,
) -> Result<ReadFile<ReadDocument>, SyntaxError> {
    let parse = |t: &str| -> Result<(Node, EarlyEntries), SyntaxError> {
        let mut early = EarlyEntries::default();
        let root = crate::source::yaml::parse_with(t, file, &mut |section, key, value| {
            early.take(section, key, value)
        })?;
        Ok((root, early))
    };
    let halves = split_hosts(text, split_over).and_then(|(a, b)| {
        let (ra, rb) = std::thread::scope(|s| {
            let hb = s.spawn(|| parse(&b));
            let ra = parse(&a);
            (ra, hb.join())
        });
        // Any error: parse the whole file as one, which reports it as it is.
        let (root, mut early) = ra.ok()?;
        let (_, mut late) = rb.ok()?.ok()?;
        // The second half's hosts belong to the first half's `hosts:` key, after its own.
        let at = early.hosts.first().map(|h| h.0)?;
        early
            .hosts
            .extend(late.hosts.drain(..).map(|(_, e)| (at, e)));
        Some((root, early))
    });
    let (root, early) = match halves {
        Some(h) => h,
        None => parse(text)?,
    };
    let mut cx = Cx {
        problems: Vec::new(),
    };
    let includes = crate::source::include_patterns(&root, &mut cx.problems);
    let doc = Document { file, root };
    let raw = collect(&doc, early, &mut cx);
    crate::par::drop_later(doc);
    Ok((
        ReadDocument {
            raw,
            problems: cx.problems,
        },
        includes,
        Vec::new(),
    ))
}

/// Two texts that parse to what `text` does, when its `hosts:` section is a block
/// mapping of more than `over` bytes: the file with the second half of the hosts
/// blanked out, and those hosts alone under a `hosts:` key. Blank lines stand in for
/// what each leaves out, so every position stays the file's. `None` when the section
/// cannot be cut safely: anchors, aliases, merge keys or tabs in it, or no line where an
/// entry starts at the section's indentation (by YAML's rules, nothing else can be
/// there: flow and multi-line values are indented deeper).
fn split_hosts(text: &str, over: usize) -> Option<(String, String)> {
    // A document written as one flow mapping has no block sections to cut.
    let root = text
        .lines()
        .map(str::trim_start)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("---"));
    if root.is_some_and(|l| l.starts_with(['{', '['])) {
        return None;
    }
    let mut at = 0usize;
    let mut body = None;
    for line in text.split_inclusive('\n') {
        at += line.len();
        let rest = line.strip_prefix("hosts:").map(str::trim_start);
        if rest.is_some_and(|r| r.is_empty() || r.starts_with('#')) {
            body = Some(at);
            break;
        }
    }
    let body = body?;
    // The section ends at the next line that starts in column 0 (a comment does not).
    let mut end = text.len();
    let mut pos = body;
    for line in text[body..].split_inclusive('\n') {
        let first = line.as_bytes().first().copied();
        if !matches!(first, None | Some(b' ' | b'#' | b'\n' | b'\r')) {
            end = pos;
            break;
        }
        pos += line.len();
    }
    let section = &text[body..end];
    if section.len() <= over || section.contains(['&', '*', '\t']) || section.contains("<<") {
        return None;
    }
    let entry_line = |line: &str, indent: usize| {
        line.len() > indent
            && line.as_bytes()[..indent].iter().all(|&b| b == b' ')
            && !matches!(
                line.as_bytes()[indent],
                b' ' | b'#' | b'-' | b'\r' | b'\n' | b'{' | b'['
            )
    };
    let first = section
        .split_inclusive('\n')
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))?;
    let indent = first.len() - first.trim_start_matches(' ').len();
    if indent == 0 || !entry_line(first, indent) {
        return None;
    }
    let mut cut = None;
    let mut pos = body;
    for line in section.split_inclusive('\n') {
        if pos >= body + section.len() / 2 && entry_line(line, indent) {
            cut = Some(pos);
            break;
        }
        pos += line.len();
    }
    let cut = cut?;
    let newlines = |t: &str| t.bytes().filter(|&b| b == b'\n').count();
    let before = newlines(&text[..cut]);
    let mut a = String::with_capacity(cut + (end - cut) / 8 + text.len() - end);
    a.push_str(&text[..cut]);
    a.extend(std::iter::repeat_n('\n', newlines(&text[cut..end])));
    a.push_str(&text[end..]);
    // The `hosts:` key of the second text sits on the line before its first entry.
    let mut b = String::with_capacity(before + 8 + end - cut);
    b.extend(std::iter::repeat_n('\n', before.checked_sub(1)?));
    b.push_str("hosts:\n");
    b.push_str(&text[cut..end]);
    Some((a, b))
}

fn collect(doc: &Document, mut early: EarlyEntries, cx: &mut Cx) -> Raw {
    let mut raw = Raw::new();
    let entries = match &doc.root.value {
        Value::Map(entries) => entries.as_slice(),
        Value::Null => &[],
        other => {
            cx.err(
                Diagnostic::new(
                    format!(
                        "a fleet file must be a mapping of sections, found {}",
                        other.kind()
                    ),
                    doc.root.loc,
                )
                .hint(format!(
                    "start with `version: 1`, then sections such as: {}",
                    SECTIONS[2..].join(", ")
                )),
            );
            return raw;
        }
    };
    let mut version_seen = false;
    let mut keys_seen: HashMap<&str, Loc> = HashMap::new();
    for (k, v) in entries {
        let Value::Str(key) = &k.value else {
            cx.err(Diagnostic::new(
                format!("section names are text, found {}", k.value.kind()),
                k.loc,
            ));
            continue;
        };
        if let Some(first) = keys_seen.insert(key.as_str(), k.loc) {
            cx.err(
                Diagnostic::new(format!("section `{key}` appears twice in this file"), k.loc)
                    .note("first here", first)
                    .hint("merge the two into one section"),
            );
            continue;
        }
        match key.as_str() {
            "version" => {
                version_seen = true;
                match from_node::<Sp<u32>>(v) {
                    Ok(n) if n.value == 1 => {}
                    Ok(n) => cx.err(
                        Diagnostic::new(format!("unsupported fleet version {}", n.value), n.loc)
                            .hint("this fleetwave reads version 1"),
                    ),
                    Err(e) => cx.de_error(e, v.loc, None),
                }
            }
            "include" => {} // read by the loader
            "sites" => read_section(v, under(&mut early.sites, k.loc), &mut raw.sites, cx),
            "images" => read_section(v, under(&mut early.images, k.loc), &mut raw.images, cx),
            "hosts" => read_section(v, under(&mut early.hosts, k.loc), &mut raw.hosts, cx),
            "groups" => read_section(v, under(&mut early.groups, k.loc), &mut raw.groups, cx),
            "multicast" => read_section(
                v,
                under(&mut early.multicast, k.loc),
                &mut raw.multicast,
                cx,
            ),
            "waves" => read_section(v, under(&mut early.waves, k.loc), &mut raw.waves, cx),
            "windows" => match from_node::<Option<Vec<Sp<String>>>>(v) {
                Ok(w) => raw.windows.extend(w.unwrap_or_default()),
                Err(e) => cx.de_error(e, v.loc, None),
            },
            other => {
                let hint = match did_you_mean(other, SECTIONS) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected one of: {}", SECTIONS.join(", ")),
                };
                cx.err(Diagnostic::new(format!("unknown section `{other}`"), k.loc).hint(hint));
            }
        }
    }
    if doc.file == 0 && !version_seen {
        cx.err(
            Diagnostic::new("missing `version`", doc.root.loc)
                .hint("start the fleet file with `version: 1`"),
        );
    }
    raw
}

/// A section entry read while its file was still being parsed: its name, the result
/// of reading it, and where its value starts.
type Early<T> = (Node, Result<Box<T>, DeError>, Loc);

fn read_section<T>(node: &Node, early: Vec<Early<T>>, section: &mut Section<T>, cx: &mut Cx)
where
    T: for<'de> serde::Deserialize<'de> + Send,
{
    let entries = match &node.value {
        Value::Map(e) => e,
        Value::Null if early.is_empty() => return,
        Value::Null => &Vec::new(),
        other => {
            cx.err(
                Diagnostic::new(
                    format!(
                        "wrong type: expected a mapping of {} names to their settings, found {}",
                        section.kind,
                        other.kind()
                    ),
                    node.loc,
                )
                .hint("write `name: {...}` entries under this key"),
            );
            return;
        }
    };
    // Deserializing entries is the costly part, and each stands alone: all cores.
    let results = crate::par::map_chunks(entries, |chunk| {
        chunk
            .iter()
            .map(|(_, v)| from_node::<T>(v).map(Box::new))
            .collect()
    });
    section.ok.reserve(early.len() + entries.len());
    let late = entries
        .iter()
        .zip(results)
        .map(|((k, v), r)| (k.clone(), r, v.loc));
    for (k, result, value_loc) in early.into_iter().chain(late) {
        let Some(name) = k.scalar_text() else {
            cx.err(Diagnostic::new(
                format!(
                    "a {} name must be text, found {}",
                    section.kind,
                    k.value.kind()
                ),
                k.loc,
            ));
            continue;
        };
        if let Some(first) = section.seen.get(&name) {
            cx.err(
                Diagnostic::new(format!("{} `{name}` is defined twice", section.kind), k.loc)
                    .note("first defined here", *first)
                    .hint(format!("rename one of them or remove the duplicate; {} names are unique across all included files", section.kind)),
            );
            continue;
        }
        section.seen.insert(name.clone(), k.loc);
        if !valid_name(&name) {
            cx.err(
                Diagnostic::new(format!("invalid {} name `{name}`", section.kind), k.loc)
                    .hint("names start with a letter or digit and hold only letters, digits, `-`, `_` and `.` (at most 63)"),
            );
        }
        match result {
            Ok(value) => {
                section.ok.insert(name, Entry { loc: k.loc, value });
            }
            Err(e) => {
                cx.de_error(e, value_loc, Some((section.kind, &name, k.loc)));
                section.broken.insert(name);
            }
        }
    }
}

fn resolve(raw: &Raw, cx: &mut Cx) -> FleetSpec {
    let sites = resolve_sites(raw, cx);
    check_subnet_overlap(raw, &sites, cx);
    let mut images = resolve_images(raw, cx);
    let multicast = resolve_multicast(raw, cx);
    let windows = resolve_windows(&raw.windows, cx);
    for (gname, g) in &raw.groups.ok {
        let g = &g.value;
        let from = format!("group `{gname}`");
        if let Some(s) = &g.site {
            raw.sites.check_ref(cx, s, || from.clone());
        }
        if let Some(i) = &g.image {
            raw.images.check_ref(cx, i, || from.clone());
        }
        if let Some(w) = &g.wave {
            raw.waves.check_ref(cx, w, || from.clone());
        }
    }
    let mut hosts = resolve_hosts(raw, &sites, cx);
    let mut waves = resolve_waves(raw, cx);
    assign_waves(raw, &mut hosts, &mut waves, cx);
    let waves = order_waves(raw, waves, cx);
    resolve_captures(raw, &mut hosts, cx);
    // A capture asked for under the host counts as the image's capture source too.
    for h in hosts.values() {
        if let Some(c) = &h.actions.capture
            && let Some(img) = images.get_mut(&c.image)
            && img.capture.is_none()
        {
            img.capture = Some(CaptureSource {
                host: h.name.clone(),
                generation: c.generation,
            });
        }
    }
    check_multicast_sites(raw, &hosts, &waves, cx);
    let mut members: FxHashMap<&str, Vec<String>> = FxHashMap::default();
    for h in hosts.values() {
        for g in &h.groups {
            members.entry(g.as_str()).or_default().push(h.name.clone());
        }
    }
    let groups = raw
        .groups
        .ok
        .iter()
        .map(|(name, g)| {
            let members = members.remove(name.as_str()).unwrap_or_default();
            let selector = g.value.selector.as_ref().map(|s| {
                s.value
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            });
            (name.clone(), Group { selector, members })
        })
        .collect();
    FleetSpec {
        sites,
        images,
        hosts,
        groups,
        multicast,
        waves,
        windows,
    }
}

fn resolve_sites(raw: &Raw, cx: &mut Cx) -> IndexMap<String, Site> {
    let mut out = IndexMap::new();
    for (name, e) in &raw.sites.ok {
        let s = &e.value;
        let before = cx.problems.len();
        let server = cx.std::<Ipv4Addr>(
            &s.server,
            "server address",
            "give this server's IPv4 address on the site, like 172.28.0.1",
        );
        let subnet = cx.std::<Ipv4Net>(
            &s.subnet,
            "subnet",
            "write the subnet in CIDR form, like 172.28.0.0/24",
        );
        if let Some(net) = subnet
            && net != net.trunc()
        {
            cx.err(
                Diagnostic::new(format!("subnet {net} has host bits set"), s.subnet.loc).hint(
                    format!(
                        "did you mean {}? a subnet is written with its network address",
                        net.trunc()
                    ),
                ),
            );
        }
        let subnet = subnet.map(|n| n.trunc());
        let relayed = s.relayed.as_ref().is_some_and(|r| r.value);
        if let (Some(ip), Some(net), false) = (server, subnet, relayed)
            && !net.contains(&ip)
        {
            cx.err(
                Diagnostic::new(
                    format!("server address {ip} is outside the site's subnet {net}"),
                    s.server.loc,
                )
                .note("subnet declared here", s.subnet.loc)
                .hint("the server must have an address on the network it serves; if its clients come through a DHCP relay, add `relayed: true`"),
            );
        }
        let mut dhcp = Dhcp {
            // Without a `dhcp:` section, only PXE options: never hand out addresses on a
            // network nobody said was ours.
            mode: DhcpMode::Proxy,
            pool: None,
            router: None,
            dns: Vec::new(),
            domain: None,
            lease_secs: 3600,
        };
        if let Some(d) = &s.dhcp {
            dhcp.mode = d.mode.value;
            dhcp.domain = d.domain.clone();
            if let Some(p) = &d.pool
                && let Some(pool) = cx.parse::<IpRange>(
                    p,
                    "write the pool as first-last, like 172.28.0.100-172.28.0.199",
                )
            {
                if let Some(net) = subnet
                    && !(net.contains(&pool.first) && net.contains(&pool.last))
                {
                    cx.err(
                        Diagnostic::new(
                            format!("pool {pool} is outside the site's subnet {net}"),
                            p.loc,
                        )
                        .note("subnet declared here", s.subnet.loc)
                        .hint("pick a pool inside the subnet"),
                    );
                } else if let (Some(net), Some(ip)) = (subnet, server) {
                    let taken = [
                        ("the server's address", ip),
                        ("the network address", net.network()),
                        ("the broadcast address", net.broadcast()),
                    ];
                    if let Some((what, addr)) = taken.iter().find(|(_, a)| pool.contains(*a)) {
                        cx.err(
                            Diagnostic::new(format!("pool {pool} contains {what} {addr}"), p.loc)
                                .hint(format!(
                                    "keep {addr} out of the pool; hand out only free host addresses"
                                )),
                        );
                    }
                }
                if d.mode.value != DhcpMode::Authoritative {
                    cx.err(
                            Diagnostic::new("a pool needs `mode: authoritative`", p.loc)
                                .note("mode set here", d.mode.loc)
                                .hint("in proxy mode the other DHCP server hands out addresses; remove the pool"),
                        );
                }
                dhcp.pool = Some(pool);
            }
            if let Some(r) = &d.router
                && let Some(ip) =
                    cx.std::<Ipv4Addr>(r, "router address", "give the gateway's IPv4 address")
            {
                if let Some(net) = subnet
                    && !net.contains(&ip)
                {
                    cx.err(
                        Diagnostic::new(
                            format!("router {ip} is outside the site's subnet {net}"),
                            r.loc,
                        )
                        .hint("clients can only reach a gateway on their own subnet"),
                    );
                }
                dhcp.router = Some(ip);
            }
            for dns in &d.dns {
                if let Some(ip) = cx.std::<Ipv4Addr>(
                    dns,
                    "DNS server address",
                    "give DNS servers as IPv4 addresses",
                ) {
                    dhcp.dns.push(ip);
                }
            }
            if let Some(l) = &d.lease
                && let Some(secs) = cx.with(l, parse_duration, "write the lease like 1h, 30m or 1d")
            {
                if secs < 60 {
                    cx.err(
                        Diagnostic::new(
                            format!("lease `{}` is shorter than a minute", l.value),
                            l.loc,
                        )
                        .hint("use at least 1m; clients renew at half the lease"),
                    );
                }
                dhcp.lease_secs = secs;
            }
        }
        // A router that is also the server was reported with the pool already.
        if let (Some(pool), Some(router), Some(d)) = (dhcp.pool, dhcp.router, &s.dhcp)
            && pool.contains(router)
            && Some(router) != server
            && let Some(p) = &d.pool
        {
            cx.err(
                Diagnostic::new(
                    format!("pool {pool} contains the router's address {router}"),
                    p.loc,
                )
                .hint(format!(
                    "keep {router} out of the pool; hand out only free host addresses"
                )),
            );
        }
        if s.interface.value.is_empty()
            || s.interface.value.len() > 15
            || s.interface.value.contains(['/', ' '])
        {
            cx.err(
                Diagnostic::new(
                    format!("invalid interface name `{}`", s.interface.value),
                    s.interface.loc,
                )
                .hint("Linux interface names are 1 to 15 characters, without `/` or spaces"),
            );
        }
        let image_store = s
            .image_store
            .as_ref()
            .map(|p| p.value.clone())
            .unwrap_or_else(|| "/images".into());
        if let Some(p) = &s.image_store
            && !p.value.starts_with('/')
        {
            cx.err(
                Diagnostic::new(
                    format!("image store `{}` is not an absolute path", p.value),
                    p.loc,
                )
                .hint("write the full path, like /images"),
            );
        }
        if cx.problems.len() != before {
            continue;
        }
        if let (Some(server), Some(subnet)) = (server, subnet) {
            out.insert(
                name.clone(),
                Site {
                    interface: s.interface.value.clone(),
                    server,
                    subnet,
                    relayed: s.relayed.as_ref().is_some_and(|r| r.value),
                    dhcp,
                    unknown_hosts: s
                        .unknown_hosts
                        .as_ref()
                        .map(|u| u.value)
                        .unwrap_or(UnknownHosts::Register),
                    image_store,
                    wake: s.wake.unwrap_or(false),
                },
            );
        }
    }
    out
}

/// Sites are separate networks: overlapping subnets would make addresses ambiguous.
fn check_subnet_overlap(raw: &Raw, sites: &IndexMap<String, Site>, cx: &mut Cx) {
    let list: Vec<(&String, &Site)> = sites.iter().collect();
    for (i, (a, sa)) in list.iter().enumerate() {
        for (b, sb) in &list[i + 1..] {
            if sa.subnet.contains(&sb.subnet.network()) || sb.subnet.contains(&sa.subnet.network())
            {
                let (Some(ea), Some(eb)) = (raw.sites.ok.get(*a), raw.sites.ok.get(*b)) else {
                    continue;
                };
                cx.err(
                    Diagnostic::new(
                        format!(
                            "subnet {} of site `{b}` overlaps subnet {} of site `{a}`",
                            sb.subnet, sa.subnet
                        ),
                        eb.value.subnet.loc,
                    )
                    .note(format!("site `{a}` declares it here"), ea.value.subnet.loc)
                    .hint("each site is its own network; give each a subnet of its own"),
                );
            }
        }
    }
}

fn resolve_images(raw: &Raw, cx: &mut Cx) -> IndexMap<String, Image> {
    let mut out = IndexMap::new();
    for (name, e) in &raw.images.ok {
        let i = &e.value;
        let pin = i.pin.as_ref().and_then(|p| cx.parse::<Digest>(p, "copy the digest of a captured version, or remove the pin to deploy the newest capture"));
        let capture = i.capture.as_ref().map(|c| CaptureSource {
            host: c.from.value.clone(),
            generation: cx.generation(&c.generation),
        });
        out.insert(
            name.clone(),
            Image {
                os: i.os,
                description: i.description.clone(),
                capture,
                pin,
            },
        );
    }
    out
}

fn resolve_multicast(raw: &Raw, cx: &mut Cx) -> IndexMap<String, MulticastGroup> {
    let mut out = IndexMap::new();
    let mut addresses: HashMap<(Ipv4Addr, u16), (String, Loc)> = HashMap::new();
    for (name, e) in &raw.multicast.ok {
        let m = &e.value;
        let Some(address) = cx.std::<Ipv4Addr>(
            &m.address,
            "multicast address",
            "use an IPv4 multicast address, normally in 239.0.0.0/8",
        ) else {
            continue;
        };
        if !address.is_multicast() {
            cx.err(
                Diagnostic::new(
                    format!("{address} is not a multicast address"),
                    m.address.loc,
                )
                .hint("use an address in 239.0.0.0/8 (organisation-local multicast)"),
            );
            continue;
        }
        let port = m.port.as_ref().map(|p| p.value).unwrap_or(9000);
        if let Some(p) = &m.port
            && p.value < 1024
        {
            cx.err(
                Diagnostic::new(format!("port {} is a privileged port", p.value), p.loc)
                    .hint("use a port of 1024 or above, like 9000"),
            );
        }
        if let Some((other, loc)) = addresses.get(&(address, port)) {
            cx.err(
                Diagnostic::new(format!("multicast group `{name}` uses {address}:{port} like `{other}`"), m.address.loc)
                    .note("also used here", *loc)
                    .hint("give each multicast group its own address or port, or sessions would receive each other's data"),
            );
        }
        addresses.insert((address, port), (name.clone(), m.address.loc));
        let min_receivers = m.min_receivers.as_ref().map(|v| v.value).unwrap_or(1);
        if let Some(v) = &m.min_receivers
            && v.value == 0
        {
            cx.err(
                Diagnostic::new("min_receivers must be at least 1", v.loc)
                    .hint("a session needs a receiver; use 1 to start with the first one"),
            );
        }
        let max_wait_secs = match &m.max_wait {
            Some(w) => cx
                .with(w, parse_duration, "write it like 10m or 1h")
                .unwrap_or(300),
            None => 300,
        };
        let max_rate_bps = match &m.max_rate {
            Some(r) => cx
                .with(r, parse_rate, "write it like 900Mbit, 1Gbit or 100MB/s")
                .unwrap_or(900_000_000),
            None => 900_000_000,
        };
        out.insert(
            name.clone(),
            MulticastGroup {
                address,
                port,
                min_receivers,
                max_wait_secs,
                max_rate_bps,
            },
        );
    }
    out
}

fn resolve_windows(list: &[Sp<String>], cx: &mut Cx) -> Vec<Window> {
    list.iter()
        .filter_map(|w| {
            cx.parse::<Window>(w, "see docs/fleet-yaml.md#windows for the accepted forms")
        })
        .collect()
}

fn disk_selector(d: &wire::DiskSelector, cx: &mut Cx) -> DiskSelector {
    let size = d
        .size
        .as_ref()
        .and_then(|s| cx.parse::<SizeRange>(s, "write it like 256G, >=200G or 200G-600G"));
    if let Some(m) = &d.model
        && let Err(e) = glob::Pattern::new(&m.value)
    {
        cx.err(
            Diagnostic::new(format!("invalid model pattern `{}`: {e}", m.value), m.loc)
                .hint("use * and ? as wildcards"),
        );
    }
    DiskSelector {
        size,
        serial: d.serial.clone(),
        model: d.model.as_ref().map(|m| m.value.clone()),
        path: d.path.clone(),
    }
}

fn selects(selector: &IndexMap<String, String>, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Group selectors indexed by one of their labels, so matching a host costs a few
/// lookups instead of a pass over every group (thousands of rooms, 100,000 hosts).
struct SelectorIndex<'a> {
    by_label: FxHashMap<(&'a str, &'a str), Vec<(&'a str, &'a Selector)>>,
    /// Empty selectors: they select every host.
    everyone: Vec<&'a str>,
}

impl<'a> SelectorIndex<'a> {
    fn new(groups: &'a Section<wire::Group>) -> Self {
        let mut index = SelectorIndex {
            by_label: FxHashMap::default(),
            everyone: Vec::new(),
        };
        for (name, g) in &groups.ok {
            let Some(sel) = &g.value.selector else {
                continue;
            };
            match sel.value.first() {
                Some((k, v)) => index
                    .by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push((name.as_str(), &sel.value)),
                None => index.everyone.push(name),
            }
        }
        index
    }

    fn matching(&self, labels: &Labels) -> Vec<&'a str> {
        let mut out = self.everyone.clone();
        for (k, v) in labels.iter() {
            if let Some(candidates) = self.by_label.get(&(k.as_str(), v.as_str())) {
                out.extend(
                    candidates
                        .iter()
                        .filter(|(_, sel)| selects(sel, labels))
                        .map(|(n, _)| *n),
                );
            }
        }
        out
    }
}

fn resolve_hosts(
    raw: &Raw,
    sites: &IndexMap<String, Site>,
    cx: &mut Cx,
) -> IndexMap<String, Host, FxBuildHasher> {
    let selectors = SelectorIndex::new(&raw.groups);
    let entries: Vec<(&String, &Entry<wire::Host>)> = raw.hosts.ok.iter().collect();
    // Per-host checks touch nothing shared, so they run on every core; duplicates
    // across hosts are found afterwards, in file order.
    let resolved = crate::par::map_chunks(&entries, |chunk| {
        chunk
            .iter()
            .map(|(name, e)| {
                let mut local = Cx {
                    problems: Vec::new(),
                };
                let host = resolve_host(raw, sites, &selectors, name, e, &mut local);
                (host, local.problems)
            })
            .collect()
    });
    let mut out = IndexMap::with_capacity_and_hasher(entries.len(), FxBuildHasher);
    let mut macs: FxHashMap<Mac, (&str, Loc)> =
        FxHashMap::with_capacity_and_hasher(entries.len(), FxBuildHasher);
    let mut ips: FxHashMap<Ipv4Addr, (&str, Loc)> = FxHashMap::default();
    for ((name, e), (host, problems)) in entries.iter().zip(resolved) {
        cx.problems.extend(problems);
        let Some(host) = host else { continue };
        let mut unique = true;
        match macs.get(&host.mac) {
            Some((other, loc)) => {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "duplicate MAC {}: hosts `{other}` and `{name}` both use it",
                            host.mac
                        ),
                        e.value.mac.loc,
                    )
                    .note(format!("`{other}` uses it here"), *loc)
                    .hint("every machine has its own MAC; fix the typo or remove one of the hosts"),
                );
                unique = false;
            }
            None => {
                macs.insert(host.mac, (name, e.value.mac.loc));
            }
        }
        if let (Some(addr), Some(ip_s)) = (host.ip, &e.value.ip) {
            match ips.get(&addr) {
                Some((other, loc)) => {
                    cx.err(
                        Diagnostic::new(format!("duplicate fixed IP {addr}: hosts `{other}` and `{name}` both use it"), ip_s.loc)
                            .note(format!("`{other}` uses it here"), *loc)
                            .hint("give each host its own address"),
                    );
                    unique = false;
                }
                None => {
                    ips.insert(addr, (name, ip_s.loc));
                }
            }
        }
        if unique {
            out.insert((*name).clone(), host);
        }
    }
    out
}

/// What an address of the site is already used for, if anything.
fn reserved_address(site: &Site, addr: Ipv4Addr) -> Option<&'static str> {
    if addr == site.server {
        Some("the server's address")
    } else if Some(addr) == site.dhcp.router {
        Some("the router's address")
    } else if addr == site.subnet.network() {
        Some("the network address of the subnet")
    } else if addr == site.subnet.broadcast() {
        Some("the broadcast address of the subnet")
    } else {
        None
    }
}

/// One host with its group defaults applied, or `None` when it has problems (reported).
fn resolve_host(
    raw: &Raw,
    sites: &IndexMap<String, Site>,
    selectors: &SelectorIndex,
    name: &str,
    e: &Entry<wire::Host>,
    cx: &mut Cx,
) -> Option<Host> {
    let h = &e.value;
    let mac = match h.mac.value.parse::<Mac>() {
        Ok(m) => Some(m),
        Err(e) => {
            let hint = if e.contains("multicast") {
                "the first pair of a NIC's MAC is even; check for a typo in it"
            } else {
                "write it as six hex pairs separated by colons, like 52:54:00:28:00:11"
            };
            cx.err(Diagnostic::new(e, h.mac.loc).hint(hint));
            None
        }
    };
    // Groups: named by the host, or selecting it by its own labels.
    // Own labels first: a group's label never replaces one the host has.
    let own_labels: Labels = h.labels.iter().collect();
    let mut groups: Vec<&str> = Vec::new();
    for g in &h.groups {
        if raw.groups.check_ref(cx, g, || format!("host `{name}`"))
            && raw.groups.ok.contains_key(&g.value)
        {
            groups.push(&g.value);
        }
    }
    for gname in selectors.matching(&own_labels) {
        if !groups.contains(&gname) {
            groups.push(gname);
        }
    }
    groups.sort_unstable();
    let group_entries: Vec<(&str, &wire::Group)> = groups
        .iter()
        .map(|g| (*g, &*raw.groups.ok[*g].value))
        .collect();

    let site = pick(
        cx,
        name,
        h.site.as_ref(),
        &group_entries,
        |g| g.site.as_ref(),
        "site",
    );
    let image = pick(
        cx,
        name,
        h.image.as_ref(),
        &group_entries,
        |g| g.image.as_ref(),
        "image",
    );
    let wave = pick(
        cx,
        name,
        h.wave.as_ref(),
        &group_entries,
        |g| g.wave.as_ref(),
        "wave",
    );
    let disk = match &h.disk {
        Some(d) => Some(d),
        None => {
            let from: Vec<(&str, &wire::DiskSelector)> = group_entries
                .iter()
                .filter_map(|(n, g)| g.disk.as_ref().map(|d| (*n, d)))
                .collect();
            if from.len() > 1 {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "host `{name}` gets a disk selector from several groups: {}",
                            from.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                        ),
                        e.loc,
                    )
                    .hint("set `disk` on the host, or keep it in one group only"),
                );
            }
            from.first().map(|(_, d)| *d)
        }
    };
    let suspend = h
        .suspend
        .or_else(|| group_entries.iter().find_map(|(_, g)| g.suspend))
        .unwrap_or(false);
    let wake = h
        .wake
        .or_else(|| group_entries.iter().find_map(|(_, g)| g.wake));
    let heal = h
        .heal
        .or_else(|| group_entries.iter().find_map(|(_, g)| g.heal))
        .unwrap_or_default();
    let mut labels = own_labels;
    for (_, g) in &group_entries {
        for (k, v) in &g.labels {
            labels.add_missing(k, v);
        }
    }

    // A default that came from a group was checked once, at the group.
    let own = |v: Option<&Sp<String>>, o: &Option<Sp<String>>| v.is_some() && o.is_some();
    let site_name = match site {
        Some(s) => {
            if own(site, &h.site) {
                raw.sites.check_ref(cx, s, || format!("host `{name}`"));
            } else if !raw.sites.knows(&s.value) {
                return None;
            }
            Some(s.value.clone())
        }
        None => {
            cx.err(
                Diagnostic::new(format!("host `{name}` has no site"), e.loc)
                    .hint("set `site:` on the host or on a group that selects it"),
            );
            None
        }
    };
    if let Some(i) = image
        && own(image, &h.image)
    {
        raw.images.check_ref(cx, i, || format!("host `{name}`"));
    }
    if let Some(w) = wave
        && own(wave, &h.wave)
    {
        raw.waves.check_ref(cx, w, || format!("host `{name}`"));
    }
    let site = site_name.as_deref().and_then(|s| sites.get(s));
    let mut ip = None;
    if let Some(ip_s) = &h.ip
        && let Some(addr) = cx.std::<Ipv4Addr>(
            ip_s,
            "fixed IP",
            "write the fixed address as an IPv4 address, like 172.28.0.11",
        )
    {
        ip = Some(addr);
        if let (Some(site), Some(sname)) = (site, site_name.as_deref()) {
            if !site.subnet.contains(&addr) {
                cx.err(
                    Diagnostic::new(format!("fixed IP {addr} of host `{name}` is outside subnet {} of site `{sname}`", site.subnet), ip_s.loc)
                        .hint("pick an address inside the site's subnet, or move the host to the right site"),
                );
            } else if let Some(pool) = site.dhcp.pool.filter(|p| p.contains(addr)) {
                cx.err(
                    Diagnostic::new(format!("fixed IP {addr} of host `{name}` is inside the dynamic pool {pool} of site `{sname}`"), ip_s.loc)
                        .hint("reservations must lie outside the pool, or a pool client could be handed the same address"),
                );
            } else if let Some(what) = reserved_address(site, addr) {
                cx.err(
                    Diagnostic::new(
                        format!("fixed IP {addr} of host `{name}` is {what}"),
                        ip_s.loc,
                    )
                    .hint("pick a free host address"),
                );
            }
        }
    }
    let disk = disk.map(|d| disk_selector(d, cx)).unwrap_or_default();
    let mut actions = Actions::default();
    if let Some(a) = &h.actions {
        if let Some(c) = &a.capture {
            raw.images
                .check_ref(cx, &c.image, || format!("capture action of host `{name}`"));
            actions.capture = Some(CaptureAction {
                image: c.image.value.clone(),
                generation: cx.generation(&c.generation),
            });
        }
        actions.wipe = a.wipe.as_ref().map(|w| WipeAction {
            mode: w.mode,
            generation: cx.generation(&w.generation),
        });
        actions.inventory = a.inventory.as_ref().map(|g| cx.generation(&g.generation));
        actions.verify = a.verify.as_ref().map(|g| cx.generation(&g.generation));
    }
    if !cx.problems.is_empty() {
        return None;
    }
    Some(Host {
        name: name.to_string(),
        mac: mac?,
        site: site_name?,
        ip,
        labels,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        image: image.map(|i| i.value.clone()),
        wave: wave.map(|w| w.value.clone()).unwrap_or_default(),
        disk,
        suspend,
        wake,
        heal,
        actions,
    })
}

/// The host's own value, or the one its groups agree on.
fn pick<'a>(
    cx: &mut Cx,
    host: &str,
    own: Option<&'a Sp<String>>,
    groups: &[(&str, &'a wire::Group)],
    field: fn(&'a wire::Group) -> Option<&'a Sp<String>>,
    what: &str,
) -> Option<&'a Sp<String>> {
    if own.is_some() {
        return own;
    }
    let mut found: Option<(&str, &'a Sp<String>)> = None;
    for (gname, g) in groups {
        if let Some(v) = field(g) {
            match found {
                Some((first, fv)) if fv.value != v.value => {
                    cx.err(
                        Diagnostic::new(
                            format!("host `{host}` gets {what} `{}` from group `{first}` and `{}` from group `{gname}`", fv.value, v.value),
                            v.loc,
                        )
                        .note(format!("group `{first}` sets it here"), fv.loc)
                        .hint(format!("set `{what}` on the host itself, or make the groups agree")),
                    );
                }
                Some(_) => {}
                None => found = Some((gname, v)),
            }
        }
    }
    found.map(|(_, v)| v)
}

fn resolve_waves(raw: &Raw, cx: &mut Cx) -> IndexMap<String, Wave> {
    let mut out = IndexMap::new();
    for (name, e) in &raw.waves.ok {
        let w = &e.value;
        for a in &w.after {
            // The implicit wave of unassigned hosts may be waited for too.
            if a.value != DEFAULT_WAVE {
                raw.waves.check_ref(cx, a, || format!("wave `{name}`"));
            }
            if a.value == *name {
                cx.err(
                    Diagnostic::new(format!("wave `{name}` is after itself"), a.loc)
                        .hint("remove it from its own `after`"),
                );
            }
        }
        let transport = w
            .transport
            .as_ref()
            .map(|t| t.value)
            .unwrap_or(Transport::Unicast);
        if let Some(m) = &w.multicast {
            raw.multicast.check_ref(cx, m, || format!("wave `{name}`"));
            if transport == Transport::Unicast {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "wave `{name}` names a multicast group but its transport is unicast"
                        ),
                        m.loc,
                    )
                    .hint("set `transport: multicast` (or auto), or remove `multicast:`"),
                );
            }
        } else if transport != Transport::Unicast {
            let loc = w.transport.as_ref().map(|t| t.loc).unwrap_or(e.loc);
            cx.err(
                Diagnostic::new(
                    format!(
                        "wave `{name}` uses {} transport but names no multicast group",
                        if transport == Transport::Auto {
                            "auto"
                        } else {
                            "multicast"
                        }
                    ),
                    loc,
                )
                .hint("add `multicast: <group>` naming an entry of the `multicast:` section"),
            );
        }
        let failure_budget = match &w.failure_budget {
            None => FailureBudget::Count(0),
            Some(Sp {
                value: wire::FailureBudget::Count(n),
                ..
            }) => FailureBudget::Count(*n),
            Some(Sp {
                value: wire::FailureBudget::Share(s),
                loc,
            }) => {
                match s
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<f64>().ok())
                    .filter(|p| (0.0..=100.0).contains(p))
                {
                    Some(p) => FailureBudget::Percent(p),
                    None => {
                        cx.err(
                            Diagnostic::new(format!("invalid failure budget `{s}`"), *loc)
                                .hint("write a count like 3 or a share like \"10%\" (0-100%)"),
                        );
                        FailureBudget::Count(0)
                    }
                }
            }
        };
        if let Some(m) = &w.members {
            for h in &m.hosts {
                raw.hosts.check_ref(cx, h, || format!("wave `{name}`"));
            }
            for g in &m.groups {
                raw.groups.check_ref(cx, g, || format!("wave `{name}`"));
            }
        }
        if let Some(p) = &w.max_parallel
            && p.value == 0
        {
            cx.err(
                Diagnostic::new("max_parallel must be at least 1", p.loc)
                    .hint("remove it for no limit"),
            );
        }
        let windows = w.windows.as_ref().map(|l| resolve_windows(l, cx));
        out.insert(
            name.clone(),
            Wave {
                after: w.after.iter().map(|a| a.value.clone()).collect(),
                transport,
                multicast: w.multicast.as_ref().map(|m| m.value.clone()),
                max_parallel: w.max_parallel.as_ref().map(|p| p.value),
                canary: w.canary.as_ref().map(|c| c.value).unwrap_or(0),
                failure_budget,
                windows,
                declared: true,
            },
        );
    }
    out
}

/// Give every host exactly one wave: its own `wave:` (or its groups'), or the wave whose
/// `members` select it, or the implicit `default` wave.
fn assign_waves(
    raw: &Raw,
    hosts: &mut IndexMap<String, Host, FxBuildHasher>,
    waves: &mut IndexMap<String, Wave>,
    cx: &mut Cx,
) {
    // host -> (wave, where the claim was made)
    let mut claims: FxHashMap<String, (String, Option<Loc>)> = FxHashMap::default();
    for (wname, e) in &raw.waves.ok {
        let Some(m) = &e.value.members else { continue };
        let mut claim = |host: &str, loc: Loc, cx: &mut Cx| {
            let Some(h) = hosts.get(host) else { return };
            if !h.wave.is_empty() && h.wave != *wname {
                cx.err(
                    Diagnostic::new(format!("host `{host}` is in wave `{}` but wave `{wname}` also claims it", h.wave), loc)
                        .note_opt(raw.hosts.ok.get(host).and_then(|e| e.value.wave.as_ref()).map(|w| (format!("`{host}` names wave `{}` here", h.wave), w.loc)))
                        .hint("a host is in one wave: remove it from this wave's members or change its `wave:`"),
                );
                return;
            }
            match claims.get(host) {
                Some((other, other_loc)) if other != wname => {
                    let mut d = Diagnostic::new(
                        format!("host `{host}` is claimed by waves `{other}` and `{wname}`"),
                        loc,
                    )
                    .hint("a host is in one wave: narrow the members of one of them");
                    if let Some(l) = other_loc {
                        d = d.note(format!("wave `{other}` claims it here"), *l);
                    }
                    cx.err(d);
                }
                Some(_) => {}
                None => {
                    claims.insert(host.to_string(), (wname.clone(), Some(loc)));
                }
            }
        };
        for h in &m.hosts {
            claim(&h.value, h.loc, cx);
        }
        for g in &m.groups {
            let members: Vec<String> = hosts
                .values()
                .filter(|h| h.groups.contains(&g.value))
                .map(|h| h.name.clone())
                .collect();
            for h in members {
                claim(&h, g.loc, cx);
            }
        }
        if let Some(sel) = &m.selector {
            let members: Vec<String> = hosts
                .values()
                .filter(|h| selects(sel, &h.labels))
                .map(|h| h.name.clone())
                .collect();
            for h in members {
                claim(&h, e.loc, cx);
            }
        }
    }
    let mut needs_default = false;
    for h in hosts.values_mut() {
        if h.wave.is_empty() {
            match claims.get(&h.name) {
                Some((w, _)) => h.wave = w.clone(),
                None => {
                    h.wave = DEFAULT_WAVE.to_string();
                    needs_default = true;
                }
            }
        }
    }
    let referenced = waves
        .values()
        .any(|w| w.after.iter().any(|a| a == DEFAULT_WAVE));
    if (needs_default || referenced) && !waves.contains_key(DEFAULT_WAVE) {
        waves.insert(
            DEFAULT_WAVE.to_string(),
            Wave {
                after: Vec::new(),
                transport: Transport::Unicast,
                multicast: None,
                max_parallel: None,
                canary: 0,
                failure_budget: FailureBudget::Count(0),
                windows: None,
                declared: false,
            },
        );
    }
}

/// Order waves so each comes after everything in its `after`; report cycles.
fn order_waves(raw: &Raw, waves: IndexMap<String, Wave>, cx: &mut Cx) -> IndexMap<String, Wave> {
    let mut graph: DiGraph<&str, ()> = DiGraph::new();
    let mut index: BTreeMap<&str, NodeIndex> = BTreeMap::new();
    for name in waves.keys() {
        index.insert(name, graph.add_node(name));
    }
    for (name, w) in &waves {
        for a in &w.after {
            if let (Some(&from), Some(&to)) = (index.get(a.as_str()), index.get(name.as_str()))
                && from != to
            {
                graph.add_edge(from, to, ());
            }
        }
    }
    for scc in petgraph::algo::tarjan_scc(&graph) {
        if scc.len() < 2 {
            continue;
        }
        // Walk the cycle from its alphabetically first wave, so the message is stable.
        let members: BTreeSet<&str> = scc.iter().map(|n| graph[*n]).collect();
        let Some(&start) = members.iter().next() else {
            continue;
        };
        let mut path = vec![start];
        let mut cur = start;
        loop {
            // Next: a member wave that lists `cur` in its `after` (edges go from prerequisite to dependent).
            let next = members.iter().copied().find(|m| {
                waves[*m].after.iter().any(|a| a == cur) && (!path.contains(m) || *m == start)
            });
            match next {
                Some(n) if n == start => {
                    path.push(start);
                    break;
                }
                Some(n) => {
                    path.push(n);
                    cur = n;
                }
                None => break,
            }
        }
        // Point at the `after` entry that closes the cycle.
        let closing = path.len().checked_sub(2).map(|i| (path[i], path[i + 1]));
        let loc = closing
            .and_then(|(prev, last)| {
                raw.waves.ok.get(last).and_then(|e| {
                    e.value
                        .after
                        .iter()
                        .find(|a| a.value == prev)
                        .map(|a| a.loc)
                })
            })
            .or_else(|| raw.waves.ok.get(start).map(|e| e.loc))
            .unwrap_or_default();
        let shown: Vec<&str> = path.iter().rev().copied().collect();
        cx.err(
            Diagnostic::new(format!("waves wait for each other in a cycle: {} (→ means \"waits for\")", shown.join(" → ")), loc)
                .hint("each wave waits for those in its `after`; break the cycle by removing one of these entries"),
        );
    }
    // Kahn's algorithm with a sorted ready set: a stable order, ties by name.
    let mut indegree: HashMap<NodeIndex, usize> = graph
        .node_indices()
        .map(|n| {
            (
                n,
                graph
                    .neighbors_directed(n, petgraph::Direction::Incoming)
                    .count(),
            )
        })
        .collect();
    let mut ready: BTreeSet<(&str, NodeIndex)> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| (graph[*n], *n))
        .collect();
    let mut order: Vec<&str> = Vec::new();
    while let Some(first) = ready.pop_first() {
        order.push(first.0);
        for next in graph.neighbors_directed(first.1, petgraph::Direction::Outgoing) {
            if let Some(d) = indegree.get_mut(&next) {
                *d -= 1;
                if *d == 0 {
                    ready.insert((graph[next], next));
                }
            }
        }
    }
    // Waves on a cycle (already reported) go last, so nothing is lost.
    for name in waves.keys() {
        if !order.contains(&name.as_str()) {
            order.push(name);
        }
    }
    let order: Vec<String> = order.into_iter().map(String::from).collect();
    let mut waves = waves;
    order
        .iter()
        .filter_map(|n| waves.swap_remove_entry(n))
        .collect()
}

/// Where a host's own `actions.capture` names its image.
fn host_capture_loc(raw: &Raw, host: &str) -> Option<Loc> {
    let e = raw.hosts.ok.get(host)?;
    e.value
        .actions
        .as_ref()?
        .capture
        .as_ref()
        .map(|c| c.image.loc)
}

/// Normalise image `capture.from` into host capture actions and check the rules around them.
fn resolve_captures(raw: &Raw, hosts: &mut IndexMap<String, Host, FxBuildHasher>, cx: &mut Cx) {
    for (iname, e) in &raw.images.ok {
        let Some(c) = &e.value.capture else { continue };
        if !raw
            .hosts
            .check_ref(cx, &c.from, || format!("image `{iname}` capture"))
        {
            continue;
        }
        let Some(h) = hosts.get_mut(&c.from.value) else {
            continue;
        };
        match &h.actions.capture {
            Some(a) if a.image != *iname => {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "host `{}` is the capture source of images `{}` and `{iname}`",
                            h.name, a.image
                        ),
                        c.from.loc,
                    )
                    .note_opt(
                        host_capture_loc(raw, &h.name)
                            .map(|l| (format!("`{}` captures `{}` here", h.name, a.image), l)),
                    )
                    .hint(
                        "a host captures one image; capture the other from another reference host",
                    ),
                );
            }
            Some(a) if a.generation != c.generation.value => {
                cx.err(
                    Diagnostic::new(format!("image `{iname}` asks for capture generation {} but host `{}` asks for {}", c.generation.value, h.name, a.generation), c.generation.loc)
                        .note_opt(host_capture_loc(raw, &h.name).map(|l| (format!("`{}` asks here", h.name), l)))
                        .hint("keep the capture in one place: under the image or under the host's actions"),
                );
            }
            _ => {
                h.actions.capture = Some(CaptureAction {
                    image: iname.clone(),
                    generation: c.generation.value,
                });
            }
        }
    }
    // One capture source per image.
    let mut source: HashMap<&str, &str> = HashMap::new();
    for h in hosts.values() {
        let Some(c) = &h.actions.capture else {
            continue;
        };
        if let Some(other) = source.insert(&c.image, &h.name)
            && other != h.name
        {
            let loc = raw.hosts.ok.get(&h.name).map(|e| e.loc).unwrap_or_default();
            let mut d = Diagnostic::new(
                format!(
                    "image `{}` is captured from two hosts: `{other}` and `{}`",
                    c.image, h.name
                ),
                loc,
            )
            .hint("an image has one reference host; pick one");
            if let Some(e) = raw.hosts.ok.get(other) {
                d = d.note(format!("`{other}` is defined here"), e.loc);
            }
            cx.err(d);
        }
        if h.image.as_deref() == Some(c.image.as_str()) {
            let loc = raw
                .hosts
                .ok
                .get(&h.name)
                .and_then(|e| e.value.image.as_ref().map(|i| i.loc))
                .or_else(|| raw.hosts.ok.get(&h.name).map(|e| e.loc))
                .unwrap_or_default();
            let mut d = Diagnostic::new(format!("host `{}` is the capture source of image `{}` and is also assigned to deploy it", h.name, c.image), loc)
                .hint("a reference machine is captured, not overwritten: remove its `image:` (or pick another reference host)");
            if let Some(cap) = raw
                .images
                .ok
                .get(&c.image)
                .and_then(|i| i.value.capture.as_ref())
            {
                d = d.note("captured from it here", cap.from.loc);
            }
            cx.err(d);
        }
    }
}

/// A multicast group serves one L2 segment: its hosts must all be on one site.
fn check_multicast_sites(
    raw: &Raw,
    hosts: &IndexMap<String, Host, FxBuildHasher>,
    waves: &IndexMap<String, Wave>,
    cx: &mut Cx,
) {
    let mut sites: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for h in hosts.values() {
        if h.image.is_none() {
            continue;
        }
        let Some(group) = waves.get(&h.wave).and_then(|w| w.multicast.as_deref()) else {
            continue;
        };
        sites
            .entry(group)
            .or_default()
            .entry(&h.site)
            .or_insert(&h.name);
    }
    for (group, by_site) in sites {
        if by_site.len() < 2 {
            continue;
        }
        let Some(e) = raw.multicast.ok.get(group) else {
            continue;
        };
        let examples: Vec<String> = by_site
            .iter()
            .map(|(s, h)| format!("`{h}` on `{s}`"))
            .collect();
        cx.err(
            Diagnostic::new(
                format!(
                    "multicast group `{group}` has hosts on several sites: {}",
                    examples.join(", ")
                ),
                e.loc,
            )
            .notes(by_site.iter().filter_map(|(s, h)| {
                let e = raw.hosts.ok.get(*h)?;
                let loc = e.value.site.as_ref().map(|x| x.loc).unwrap_or(e.loc);
                Some((format!("`{h}` is on site `{s}`"), loc))
            }))
            .hint(
                "multicast stays inside one network: use one multicast group (and wave) per site",
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceFile;

    /// A fleet of `n` hosts, each written in block or flow style, with `extra` lines
    /// appended to the hosts section.
    fn fleet(n: usize, extra: &str) -> String {
        let mut s = String::from(
            "version: 1\nsites:\n  lab: {interface: eth0, server: 10.0.0.1, subnet: 10.0.0.0/16}\n\
             images:\n  win: {os: windows}\nhosts:\n  # the lab's machines\n",
        );
        for i in 0..n {
            if i % 3 == 0 {
                s.push_str(&format!(
                    "  pc{i:04}:\n    mac: \"52:54:00:00:{:02x}:{:02x}\"\n    site: lab\n    image: win\n    labels: {{room: r{}}}\n\n",
                    i / 256,
                    i % 256,
                    i % 7
                ));
            } else {
                s.push_str(&format!(
                    "  pc{i:04}: {{mac: \"52:54:00:00:{:02x}:{:02x}\", site: lab, image: win, wave: w}}\n",
                    i / 256,
                    i % 256
                ));
            }
        }
        s.push_str(extra);
        s.push_str("# the waves\nwaves:\n  w: {transport: unicast}\n");
        s
    }

    fn built(text: &str, split_over: usize) -> Result<FleetSpec, Vec<Diagnostic>> {
        let (doc, _, problems) = read_file_split(text, 0, split_over).expect("parses");
        let loaded = Loaded {
            sources: Sources {
                files: vec![SourceFile {
                    display: "fleet.yaml".into(),
                    text: text.into(),
                }],
            },
            documents: vec![doc],
            problems,
        };
        build(loaded).1
    }

    #[test]
    fn a_hosts_section_parsed_in_halves_reads_as_it_does_whole() {
        let valid = fleet(400, "");
        assert!(
            split_hosts(&valid, 1000).is_some(),
            "the section was not cut"
        );
        let (whole, halves) = (built(&valid, usize::MAX), built(&valid, 1000));
        assert!(whole.is_ok());
        assert_eq!(format!("{whole:?}"), format!("{halves:?}"));

        // Problems on both sides of the cut, and a name defined on both sides.
        let mut bad = fleet(
            400,
            "  pc0001: {mac: \"52:54:00:00:09:09\", site: lab}\n  pc9999: {mac: \"52:54:00:00:09:0a\", site: lab, colour: red}\n",
        );
        bad = bad.replacen("52:54:00:00:00:05", "52:54:00:00:00:zz", 1);
        assert!(split_hosts(&bad, 1000).is_some(), "the section was not cut");
        let (whole, halves) = (built(&bad, usize::MAX), built(&bad, 1000));
        let problems = whole.as_ref().expect_err("invalid");
        assert!(problems.len() >= 3, "{problems:?}");
        assert_eq!(format!("{whole:?}"), format!("{halves:?}"));
    }

    #[test]
    fn a_hosts_section_with_anchors_or_a_syntax_error_is_read_whole() {
        let anchored = fleet(
            400,
            "  pc9998: &x {mac: \"52:54:00:00:09:09\", site: lab}\n",
        );
        assert!(split_hosts(&anchored, 1000).is_none());
        // One flow mapping for the whole document: not cut (it is no block section).
        let flow = format!("# a fleet\n{{\n{}}}\n", fleet(400, ""));
        assert!(split_hosts(&flow, 1000).is_none());
        // A syntax error in the second half: reported where it is, as without the cut.
        let broken = fleet(400, "  pc9999: {mac: \"52:54:00:00:09:0a\", site: lab\n");
        assert!(split_hosts(&broken, 1000).is_some());
        let (a, b) = (
            read_file_split(&broken, 0, usize::MAX).map(|_| ()),
            read_file_split(&broken, 0, 1000).map(|_| ()),
        );
        assert!(a.is_err());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
