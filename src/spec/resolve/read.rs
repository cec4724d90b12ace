//! Reading a file: its text (a large `hosts:` section parsed in two halves), then each
//! section entry into its wire type, one at a time, so one bad entry hides no other.

use super::*;

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
    let mut all = early;
    all.extend(late);
    let misplaced = misplaced_fields::<T>(&all, section.kind, cx);
    for (i, (k, result, value_loc)) in all.into_iter().enumerate() {
        match misplaced.get(&i) {
            Some(Misplaced::Field) => continue,
            Some(Misplaced::Owner) if result.is_err() => {
                // Its own error (missing fields, no mapping) follows from the same mistake.
                if let Some(name) = k.scalar_text() {
                    section.seen.entry(name.clone()).or_insert(k.loc);
                    section.broken.insert(name);
                }
                continue;
            }
            _ => {}
        }
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

/// An entry's part in an indentation mistake: the entry whose settings were meant, or
/// one of those settings, written as an entry of its own.
enum Misplaced {
    Owner,
    Field,
}

/// Entries named like a setting of the section's entries (`mac`, `site`) whose value is
/// no mapping, right after another entry: settings not indented under their entry's
/// name. Reported once for each run of them, with the entry they belong to; the
/// index of each entry taking part is returned, so nothing else is said about them.
fn misplaced_fields<T>(all: &[Early<T>], kind: &str, cx: &mut Cx) -> HashMap<usize, Misplaced>
where
    T: for<'de> serde::Deserialize<'de>,
{
    let mut out = HashMap::new();
    let not_a_mapping = |r: &Result<Box<T>, DeError>| matches!(r, Err(e) if e.message.starts_with("wrong type: expected a mapping"));
    if !all.iter().skip(1).any(|(_, r, _)| not_a_mapping(r)) {
        return out;
    }
    let fields = field_names::<T>();
    let is_field = |(k, r, _): &Early<T>| {
        not_a_mapping(r) && k.scalar_str().is_some_and(|n| fields.contains(&n))
    };
    let mut i = 0;
    while i + 1 < all.len() {
        let run = all[i + 1..].iter().take_while(|e| is_field(e)).count();
        if run == 0 || is_field(&all[i]) {
            i += 1;
            continue;
        }
        let owner = &all[i].0;
        let owner_name = owner.scalar_text().unwrap_or_default();
        let names: Vec<String> = all[i + 1..=i + run]
            .iter()
            .map(|(k, _, _)| format!("`{}`", k.scalar_text().unwrap_or_default()))
            .collect();
        let (first, last) = (all[i + 1].0.loc, all[i + run].0.loc);
        let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        let (listed, are, they) = match names.split_last() {
            Some((tail, head)) if !head.is_empty() => (
                format!("{} and {tail}", head.join(", ")),
                "are settings",
                "they belong",
            ),
            _ => (names.concat(), "is a setting", "it belongs"),
        };
        let lines = if first.line == last.line {
            format!("line {}", first.line)
        } else {
            format!("lines {}-{}", first.line, last.line)
        };
        cx.err(
            Diagnostic::new(
                format!(
                    "{listed} {are} of {article} {kind}, not {}: not indented under `{owner_name}`",
                    if run == 1 {
                        format!("a {kind} name")
                    } else {
                        format!("{kind} names")
                    }
                ),
                first,
            )
            .note(format!("the {kind} {they} to"), owner.loc)
            .hint(format!(
                "indent {lines} two spaces deeper than `{owner_name}:`"
            )),
        );
        out.insert(i, Misplaced::Owner);
        for j in i + 1..=i + run {
            out.insert(j, Misplaced::Field);
        }
        i += run + 1;
    }
    out
}

/// The setting names `T` accepts, as its "unknown field" error lists them.
fn field_names<T: for<'de> serde::Deserialize<'de>>() -> Vec<&'static str> {
    let at = Loc::default();
    let probe = Node {
        value: Value::Map(vec![(
            Node {
                value: Value::Str("\u{1}".into()),
                loc: at,
            },
            Node {
                value: Value::Null,
                loc: at,
            },
        )]),
        loc: at,
    };
    match from_node::<T>(&probe) {
        Err(e) => e
            .unknown
            .as_ref()
            .map(|(_, f)| f.clone())
            .unwrap_or_default(),
        Ok(_) => Vec::new(),
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
