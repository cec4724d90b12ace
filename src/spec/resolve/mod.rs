//! From node trees to a [`FleetSpec`], collecting every problem on the way.
//!
//! Two passes: `collect` reads each section entry into its wire type (one entry at a
//! time, so one bad host does not hide the next), then `resolve` checks values and
//! references and builds the domain types. Names whose entry failed to read are kept
//! as "known" so a typo in one host does not cascade into "unknown host" elsewhere.
//!
//! Layout: this file holds what every section shares (the problem list, sections
//! of named entries, `build` and `resolve`); `read` reads files into wire types;
//! `sites`, `images`, `hosts`, `multicast` and `waves` check and resolve their section.

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

mod hosts;
mod images;
mod multicast;
mod read;
mod sites;
mod waves;

use hosts::*;
use images::*;
use multicast::*;
pub use read::read_file;
use sites::*;
use waves::*;

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
