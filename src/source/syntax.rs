//! Syntax errors said the way a person fixes them. The YAML parser names its own
//! state ("mapping values are not allowed in this context", "did not find expected
//! key"), sometimes a line away from the mistake. In a fleet file most syntax errors are
//! indentation, a tab, a missing `:`, or a quote or bracket left open; the text around
//! the error says which, and which line to fix.

use super::yaml::SyntaxError;

/// A clearer error for `e` from the text it came from, or `e` itself.
pub fn explain(text: &str, e: SyntaxError) -> SyntaxError {
    // Lines up to just past the error: all that is looked at.
    let lines: Vec<&str> = text.lines().take(e.line as usize + 1).collect();
    tab(&lines, e.line)
        .or_else(|| unclosed(&lines, &e))
        .or_else(|| indentation(&lines, &e))
        .unwrap_or(e)
}

/// Line `n` (1-based).
fn line<'a>(lines: &[&'a str], n: u32) -> Option<&'a str> {
    lines.get((n as usize).checked_sub(1)?).copied()
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start_matches(' ').len()
}

/// Neither blank nor a comment.
fn content(l: &str) -> bool {
    let t = l.trim_start();
    !t.is_empty() && !t.starts_with('#')
}

/// The nearest line with content before line `n`.
fn previous<'a>(lines: &[&'a str], n: u32) -> Option<(u32, &'a str)> {
    (1..n)
        .rev()
        .find_map(|p| line(lines, p).filter(|l| content(l)).map(|l| (p, l)))
}

/// How a message names the line: its key, or "the list item".
fn what(l: &str) -> String {
    let t = l.trim_start();
    if t == "-" || t.starts_with("- ") {
        return "the list item".into();
    }
    let key = match t.split_once(": ") {
        Some((k, _)) => k,
        None => t.strip_suffix(':').unwrap_or(t),
    };
    let short: String = key.chars().take(40).collect();
    format!("`{}`", short.trim())
}

/// "N spaces", and "1 space".
fn spaces(n: usize) -> String {
    format!("{n} space{}", if n == 1 { "" } else { "s" })
}

/// What to do to bring a line to indentation `n`.
fn indent_by(n: usize) -> String {
    if n == 0 {
        "start it at the beginning of the line".into()
    } else {
        format!("indent it by {}", spaces(n))
    }
}

/// `key: value` with a value on the same line (so nothing may be indented under it).
fn has_inline_value(l: &str) -> bool {
    let t = l.trim_start();
    if let Some(item) = t.strip_prefix("- ") {
        // A list item of plain text: nothing may be indented under it either.
        let item = item.trim();
        if !item.contains(": ") && !item.ends_with(':') {
            return !item.is_empty() && !item.starts_with(['|', '>', '#']);
        }
    }
    let t = t.strip_prefix("- ").unwrap_or(t);
    match t.split_once(": ") {
        // A block scalar or a lone anchor still takes indented lines.
        Some((_, v)) => {
            let v = v.trim();
            !(v.is_empty()
                || v.starts_with('#')
                || v.starts_with(['|', '>'])
                || (v.starts_with('&') && !v.contains(' ')))
        }
        None => false,
    }
}

/// A tab in the indentation of the error's line, or of the lines either side (the
/// parser reports some on the line before).
fn tab(lines: &[&str], at: u32) -> Option<SyntaxError> {
    (at.saturating_sub(1).max(1)..=at + 1).find_map(|n| {
        let l = line(lines, n)?;
        let lead = &l[..l.len() - l.trim_start_matches([' ', '\t']).len()];
        let col = lead.find('\t')?;
        content(l).then(|| SyntaxError {
            message: format!("a tab in the indentation of line {n}: YAML indents with spaces only"),
            line: n,
            col: col as u32 + 1,
            hint: Some(
                "replace the tab with spaces, as many as the lines around it use (editors: \
                 set this file to indent with spaces)"
                    .into(),
            ),
        })
    })
}

/// Where a line leaves a quote open (its column).
struct Scan {
    open_quote: Option<usize>,
}

/// Read one line as YAML quotes and comments go, keeping `brackets` (line, column,
/// bracket) of the flow collections still open.
fn scan(l: &str, brackets: &mut Vec<(u32, usize, char)>, n: u32) -> Scan {
    let mut quote: Option<(char, usize)> = None;
    let mut prev = ' ';
    let mut chars = l.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some(('"', _)) if c == '\\' => {
                chars.next();
            }
            Some((q, _)) if c == q => {
                // '' inside single quotes is an escaped quote.
                if q == '\'' && chars.peek().is_some_and(|&(_, d)| d == '\'') {
                    chars.next();
                } else {
                    quote = None;
                }
            }
            Some(_) => {}
            None => match c {
                '#' if prev == ' ' || i == 0 => break,
                '"' => quote = Some((c, i)),
                // An apostrophe inside a plain word is text, not a quote.
                '\'' if prev == ' ' || matches!(prev, '[' | '{' | ',' | ':') || i == 0 => {
                    quote = Some((c, i))
                }
                '{' | '[' => brackets.push((n, i, c)),
                '}' | ']' => {
                    brackets.pop();
                }
                _ => {}
            },
        }
        prev = c;
    }
    Scan {
        open_quote: quote.map(|(_, i)| i),
    }
}

/// A quote or a flow `{`/`[` left open before the error.
fn unclosed(lines: &[&str], e: &SyntaxError) -> Option<SyntaxError> {
    let m = e.message.as_str();
    if m.contains("quoted scalar") || m.contains("end of stream") {
        for n in (1..=e.line).rev() {
            let l = line(lines, n)?;
            if let Some(col) = scan(l, &mut Vec::new(), n).open_quote {
                return Some(SyntaxError {
                    message: format!("the quote opened on line {n} is not closed"),
                    line: n,
                    col: col as u32 + 1,
                    hint: Some("end the quoted value on the same line with the same quote".into()),
                });
            }
        }
    }
    if m.contains("flow mapping") || m.contains("flow sequence") {
        let mut brackets = Vec::new();
        for n in 1..e.line {
            scan(line(lines, n)?, &mut brackets, n);
        }
        let &(n, col, c) = brackets.first()?;
        let close = if c == '{' { '}' } else { ']' };
        return Some(SyntaxError {
            message: format!("the `{c}` on line {n} is not closed"),
            line: n,
            col: col as u32 + 1,
            hint: Some(format!(
                "add `{close}` where its entries end; a `{c}...{close}` may span lines, but \
                 then every line up to the `{close}` belongs to it"
            )),
        });
    }
    None
}

/// The line is indented to no level the lines above open, or deeper than a line that
/// cannot hold it, or the line above has no `:`.
fn indentation(lines: &[&str], e: &SyntaxError) -> Option<SyntaxError> {
    let m = e.message.as_str();
    let structural = m.contains("mapping values are not allowed")
        || m.contains("did not find expected key")
        || m.contains("did not find expected '-'");
    if !structural {
        return None;
    }
    let l = line(lines, e.line).filter(|l| content(l))?;
    let (p, prev) = previous(lines, e.line)?;
    let (il, ip) = (indent(l), indent(prev));
    let pt = prev.trim_start();
    let at = |message: String, hint: String| SyntaxError {
        message,
        line: e.line,
        col: il as u32 + 1,
        hint: Some(hint),
    };
    // `interface eth0` then `server: x` at the same indentation: one key to the parser.
    if il == ip
        && m.contains("mapping values")
        && !pt.contains(": ")
        && !pt.ends_with(':')
        && !pt.starts_with(['-', '{', '[', '"', '\''])
    {
        return Some(SyntaxError {
            message: format!(
                "line {p} has no `:`, so the parser read it and line {} as one key",
                e.line
            ),
            line: p,
            col: ip as u32 + 1,
            hint: Some("write `key: value`, with a space after the colon".into()),
        });
    }
    if il > ip && has_inline_value(prev) {
        return Some(at(
            format!(
                "{} is indented {}, deeper than {} on line {p} ({ip}), whose value is already \
                 on its line",
                what(l),
                spaces(il),
                what(prev)
            ),
            if pt.starts_with('-') {
                format!("{}, like the items above", indent_by(ip))
            } else {
                format!(
                    "{}, like {}; only a key with nothing after its `:` takes lines indented \
                     under it",
                    indent_by(ip),
                    what(prev)
                )
            },
        ));
    }
    if il < ip {
        // The levels open at this point: the line above, then each line less indented.
        let mut levels = vec![(p, prev)];
        let mut min = ip;
        for n in (1..p).rev() {
            if let Some(x) = line(lines, n).filter(|x| content(x) && indent(x) < min) {
                min = indent(x);
                levels.push((n, x));
                if min == 0 {
                    break;
                }
            }
        }
        if levels.iter().any(|(_, x)| indent(x) == il) {
            return None;
        }
        let deeper = levels.iter().rev().find(|(_, x)| indent(x) > il)?;
        let shallower = levels.iter().find(|(_, x)| indent(x) < il);
        let mut message = format!(
            "{} is indented {}, which matches no level above it: {} on line {} has {}",
            what(l),
            spaces(il),
            what(deeper.1),
            deeper.0,
            indent(deeper.1)
        );
        let mut hint = format!(
            "{} to set it beside {}",
            indent_by(indent(deeper.1)),
            what(deeper.1)
        );
        if let Some((n, x)) = shallower {
            message.push_str(&format!(", {} on line {n} has {}", what(x), indent(x)));
            hint.push_str(&format!(", or {} beside {}", indent_by(indent(x)), what(x)));
        }
        return Some(at(message, hint));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(message: &str, line: u32, col: u32) -> SyntaxError {
        SyntaxError {
            message: message.into(),
            line,
            col,
            hint: None,
        }
    }

    #[test]
    fn an_apostrophe_in_a_word_is_not_an_open_quote() {
        let text = "a: don't\nb: \"x\nc: 1\n";
        let e = explain(text, err("found unexpected end of stream", 3, 1));
        assert_eq!((e.line, e.col), (2, 4), "{}", e.message);
    }

    #[test]
    fn a_flow_mapping_over_two_lines_is_not_reported_open() {
        let text = "a: {x: 1,\n    y: 2}\nb: {c: 1\nd: 2\n";
        let e = explain(
            text,
            err(
                "while parsing a flow mapping, did not find expected ',' or '}'",
                4,
                2,
            ),
        );
        assert_eq!((e.line, e.col), (3, 4), "{}", e.message);
    }

    #[test]
    fn an_error_it_cannot_explain_is_left_as_it_is() {
        let e = explain("a: *b\n", err("unknown anchor", 1, 4));
        assert_eq!(e.message, "unknown anchor");
    }
}
