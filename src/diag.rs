//! Problems found in a fleet, and how they are shown: `file:line:column`, the source
//! line with a caret under the culprit, related places, and a hint saying what to do.

use std::fmt::Write;

use serde::Serialize;

/// A position in one of the loaded files: 1-based line and column, length in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Loc {
    /// Index into [`Sources`].
    pub file: u32,
    pub line: u32,
    pub col: u32,
    pub len: u32,
}

impl Loc {
    /// One integer, so a position crosses serde in a single call.
    pub(crate) fn pack(self) -> u128 {
        (u128::from(self.file) << 96)
            | (u128::from(self.line) << 64)
            | (u128::from(self.col) << 32)
            | u128::from(self.len)
    }

    pub(crate) fn unpack(v: u128) -> Loc {
        Loc {
            file: (v >> 96) as u32,
            line: (v >> 64) as u32,
            col: (v >> 32) as u32,
            len: v as u32,
        }
    }
}

/// One file that was read, kept for rendering source lines in messages.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as the user should see it (relative to where they pointed us).
    pub display: String,
    pub text: String,
}

/// Every file read for one fleet, indexed by [`Loc::file`].
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub files: Vec<SourceFile>,
}

impl Sources {
    pub fn display(&self, loc: Loc) -> String {
        let path = self
            .files
            .get(loc.file as usize)
            .map(|f| f.display.as_str())
            .unwrap_or("?");
        format!("{path}:{}:{}", loc.line, loc.col)
    }

    pub fn line_text(&self, loc: Loc) -> Option<&str> {
        let file = self.files.get(loc.file as usize)?;
        file.text.lines().nth((loc.line as usize).checked_sub(1)?)
    }
}

/// One problem in the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub message: String,
    /// Where it is; `None` for problems that belong to no single place.
    pub loc: Option<Loc>,
    /// Other places that take part ("also used by pc01 here").
    pub notes: Vec<(String, Loc)>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, loc: Loc) -> Self {
        Diagnostic {
            message: message.into(),
            loc: Some(loc),
            notes: Vec::new(),
            hint: None,
        }
    }

    pub fn unplaced(message: impl Into<String>) -> Self {
        Diagnostic {
            message: message.into(),
            loc: None,
            notes: Vec::new(),
            hint: None,
        }
    }

    pub fn note(mut self, text: impl Into<String>, loc: Loc) -> Self {
        self.notes.push((text.into(), loc));
        self
    }

    pub fn note_opt(self, note: Option<(String, Loc)>) -> Self {
        match note {
            Some((text, loc)) => self.note(text, loc),
            None => self,
        }
    }

    pub fn notes(mut self, notes: impl IntoIterator<Item = (String, Loc)>) -> Self {
        self.notes.extend(notes);
        self
    }

    pub fn hint(mut self, text: impl Into<String>) -> Self {
        self.hint = Some(text.into());
        self
    }

    /// Sort key: file, then position, so output follows the files.
    pub fn sort_key(&self) -> (u32, u32, u32) {
        self.loc
            .map(|l| (l.file, l.line, l.col))
            .unwrap_or((u32::MAX, 0, 0))
    }
}

/// Colours for a terminal; empty strings when writing to a file or pipe.
#[derive(Debug, Clone, Copy)]
pub struct Palette {
    pub red: &'static str,
    pub blue: &'static str,
    pub cyan: &'static str,
    pub green: &'static str,
    pub yellow: &'static str,
    pub bold: &'static str,
    pub reset: &'static str,
}

impl Palette {
    pub const PLAIN: Palette = Palette {
        red: "",
        blue: "",
        cyan: "",
        green: "",
        yellow: "",
        bold: "",
        reset: "",
    };
    pub const ANSI: Palette = Palette {
        red: "\x1b[1;31m",
        blue: "\x1b[1;34m",
        cyan: "\x1b[36m",
        green: "\x1b[32m",
        yellow: "\x1b[33m",
        bold: "\x1b[1m",
        reset: "\x1b[0m",
    };

    /// Colour only on a terminal, and never when NO_COLOR is set.
    pub fn for_stream(is_terminal: bool) -> Palette {
        if is_terminal && std::env::var_os("NO_COLOR").is_none() {
            Palette::ANSI
        } else {
            Palette::PLAIN
        }
    }
}

/// Render one diagnostic the way compilers do.
pub fn render(d: &Diagnostic, sources: &Sources, p: Palette) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}error{}{}: {}{}",
        p.red, p.reset, p.bold, d.message, p.reset
    );
    if let Some(loc) = d.loc {
        snippet(&mut out, loc, sources, p, p.red);
    }
    for (text, loc) in &d.notes {
        let _ = writeln!(out, "  {}note{}: {text}", p.cyan, p.reset);
        snippet(&mut out, *loc, sources, p, p.cyan);
    }
    if let Some(h) = &d.hint {
        let _ = writeln!(out, "  {}hint{}: {h}", p.green, p.reset);
    }
    out
}

fn snippet(out: &mut String, loc: Loc, sources: &Sources, p: Palette, caret_colour: &str) {
    let _ = writeln!(out, "  {}-->{} {}", p.blue, p.reset, sources.display(loc));
    let Some(line) = sources.line_text(loc) else {
        return;
    };
    let num = loc.line.to_string();
    let pad = " ".repeat(num.len());
    let _ = writeln!(out, "  {pad} {}|{}", p.blue, p.reset);
    let _ = writeln!(out, "  {}{num} |{} {line}", p.blue, p.reset);
    // Columns count characters; keep tabs so the caret lines up under them.
    let lead: String = line
        .chars()
        .take(loc.col.saturating_sub(1) as usize)
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    let rest = line
        .chars()
        .count()
        .saturating_sub(loc.col.saturating_sub(1) as usize);
    let width = (loc.len as usize).clamp(1, rest.max(1));
    let _ = writeln!(
        out,
        "  {pad} {}|{} {lead}{caret_colour}{}{}",
        p.blue,
        p.reset,
        "^".repeat(width),
        p.reset
    );
}

/// Machine-readable form for `validate --format json`.
#[derive(Debug, Serialize)]
pub struct JsonDiagnostic {
    pub message: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub notes: Vec<JsonNote>,
    pub hint: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct JsonNote {
    pub message: String,
    pub file: String,
    pub line: u32,
    pub column: u32,
}

impl JsonDiagnostic {
    pub fn from(d: &Diagnostic, sources: &Sources) -> Self {
        let file_of = |l: Loc| {
            sources
                .files
                .get(l.file as usize)
                .map(|f| f.display.clone())
                .unwrap_or_default()
        };
        JsonDiagnostic {
            message: d.message.clone(),
            file: d.loc.map(file_of),
            line: d.loc.map(|l| l.line),
            column: d.loc.map(|l| l.col),
            notes: d
                .notes
                .iter()
                .map(|(m, l)| JsonNote {
                    message: m.clone(),
                    file: file_of(*l),
                    line: l.line,
                    column: l.col,
                })
                .collect(),
            hint: d.hint.clone(),
        }
    }
}
