//! A YAML document as a tree of nodes that each know where they came from.
//!
//! serde-saphyr parses; we keep the whole tree with positions so that the fleet
//! loader can deserialize one entry at a time (and so report every bad entry, not
//! just the first) and so that semantic checks can point at the offending value.

use std::fmt;

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde::de::{
    self, DeserializeSeed, Error as _, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, Span};

use super::Loc;

/// One YAML node: its value and where it starts.
#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    /// Integers and floats keep their text: a label `1.10` must stay "1.10".
    Int(i64, Box<str>),
    Float(f64, Box<str>),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in source order; duplicate keys are kept so the loader can report them.
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// What a person would call this kind of value, for "expected X, found Y".
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(..) => "an integer",
            Value::Float(..) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl Node {
    /// The scalar as written, without copying it.
    pub fn scalar_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            Value::Int(_, text) | Value::Float(_, text) => Some(text),
            Value::Bool(true) => Some("true"),
            Value::Bool(false) => Some("false"),
            _ => None,
        }
    }

    /// The scalar as text, the way it was written (numbers and booleans included).
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(_, text) | Value::Float(_, text) => Some(text.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// A syntax error from the YAML parser, with its position when the parser gave one.
#[derive(Debug)]
pub struct SyntaxError {
    pub message: String,
    pub line: u32,
    pub col: u32,
    /// What to do, when we know better than "fix the syntax".
    pub hint: Option<String>,
}

/// Receives each entry of a mapping under a top-level key (a host under `hosts:`, say)
/// as soon as it is complete, with the top-level key. It returns the entry to keep it
/// in the tree, or consumes it: then the entry's nodes never pile up in memory, and on
/// a large file its reading overlaps with the parsing of the rest.
pub type EntrySink<'s> = dyn FnMut(&Node, Node, Node) -> Option<(Node, Node)> + 's;

/// Parse one YAML document into a node tree, handing section entries to `sink` as they
/// complete. `file` is the source-map index stamped on every location.
///
/// Built from serde-saphyr's parser events (`serde_saphyr::granit_parser`) rather than
/// through serde: at 100,000 hosts the serde path cost 1.5 s, the events 0.45 s.
/// Plain scalars are typed by the YAML 1.2 core schema, without the 1.1 surprises
/// (`no` stays text, `0123` stays text, `52:54:00:28:00:11` stays text).
pub fn parse_with(text: &str, file: u32, sink: &mut EntrySink) -> Result<Node, SyntaxError> {
    parse_events(text, file, sink).map_err(|e| super::syntax::explain(text, e))
}

fn parse_events(text: &str, file: u32, sink: &mut EntrySink) -> Result<Node, SyntaxError> {
    if text.len() < PIPELINE_BYTES {
        let mut parser = Parser::new_from_str(text);
        let events =
            std::iter::from_fn(|| parser.next_event()).filter_map(|e| compact(e, file).transpose());
        return build_tree(events, file, sink);
    }
    // Large files: the parser runs on its own thread and the tree is built on this one
    // as the events arrive, in batches so the channel costs nothing per event.
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Item<'_>>>(16);
        s.spawn(move || {
            let mut parser = Parser::new_from_str(text);
            let mut batch = Vec::with_capacity(BATCH);
            while let Some(event) = parser.next_event() {
                let Some(event) = compact(event, file).transpose() else {
                    continue;
                };
                let last = matches!(event, Err(_) | Ok((Ev::StreamEnd, _)));
                batch.push(event);
                if batch.len() == BATCH || last {
                    // The builder hung up (it found an error): stop parsing.
                    if tx
                        .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                        .is_err()
                        || last
                    {
                        return;
                    }
                }
            }
            let _ = tx.send(batch);
        });
        build_tree(rx.into_iter().flatten(), file, sink)
    })
}

/// Files larger than this are parsed on two threads.
const PIPELINE_BYTES: usize = 1 << 20;
const BATCH: usize = 4096;

/// The parser's events cut down to what the tree needs, positions already computed:
/// a third of the size, which matters when 2 million of them cross threads.
enum Ev<'a> {
    StreamEnd,
    DocumentStart,
    /// Text, whether it is plain (typed by the core schema) or a string, its anchor.
    Scalar(Cow<'a, str>, bool, usize),
    Alias(usize),
    SeqStart(usize),
    MapStart(usize),
    End,
}

type Item<'a> = Result<(Ev<'a>, Loc), SyntaxError>;

/// `None` for events the tree has no use for (stream start, comments, ...).
fn compact<'a>(
    event: Result<(Event<'a>, Span), serde_saphyr::granit_parser::ScanError>,
    file: u32,
) -> Result<Option<(Ev<'a>, Loc)>, SyntaxError> {
    let (event, span) = event.map_err(syntax)?;
    let ev = match event {
        Event::StreamEnd => Ev::StreamEnd,
        Event::DocumentStart(..) => Ev::DocumentStart,
        Event::Scalar(value, style, anchor, tag) => {
            let forced_str = tag.as_ref().is_some_and(|t| t.suffix() == "str");
            Ev::Scalar(value, style == ScalarStyle::Plain && !forced_str, anchor)
        }
        Event::Alias(id) => Ev::Alias(id),
        Event::SequenceStart(_, anchor, _) => Ev::SeqStart(anchor),
        Event::MappingStart(_, anchor, _) => Ev::MapStart(anchor),
        Event::SequenceEnd | Event::MappingEnd => Ev::End,
        _ => return Ok(None),
    };
    Ok(Some((ev, loc_of(&span, file))))
}

fn syntax(e: serde_saphyr::granit_parser::ScanError) -> SyntaxError {
    SyntaxError {
        message: e.info(),
        line: e.marker().line() as u32,
        col: e.marker().col() as u32 + 1,
        hint: None,
    }
}

fn build_tree<'a>(
    events: impl Iterator<Item = Item<'a>>,
    file: u32,
    sink: &mut EntrySink,
) -> Result<Node, SyntaxError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    for event in events {
        let (event, loc) = event?;
        let done = match event {
            Ev::StreamEnd => break,
            Ev::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        message: "a second YAML document (`---`) in one fleet file".into(),
                        line: loc.line,
                        col: loc.col,
                        hint: Some(
                            "a fleet file holds one document: move the others into their own files and `include:` them".into(),
                        ),
                    });
                }
                None
            }
            Ev::Scalar(value, is_plain, anchor) => {
                let v = if is_plain {
                    plain(&value)
                } else {
                    Value::Str(value.into_owned())
                };
                let node = Node { value: v, loc };
                if anchor != 0 {
                    anchors.insert(anchor, node.clone());
                }
                Some(node)
            }
            Ev::Alias(id) => match anchors.get(&id) {
                Some(n) => Some(Node {
                    value: n.value.clone(),
                    loc,
                }),
                None => {
                    return Err(SyntaxError {
                        message: "alias to an anchor that is not defined before it".into(),
                        line: loc.line,
                        col: loc.col,
                        hint: Some(
                            "define the anchor (`&name`) before using the alias (`*name`)".into(),
                        ),
                    });
                }
            },
            Ev::SeqStart(anchor) => {
                stack.push(Frame::Seq(loc, anchor, Vec::new()));
                None
            }
            Ev::MapStart(anchor) => {
                // A host or a site has a handful of keys: one allocation, not three.
                stack.push(Frame::Map(loc, anchor, Vec::with_capacity(8), None));
                None
            }
            Ev::End => {
                let node = match stack.pop() {
                    Some(Frame::Seq(loc, anchor, items)) => {
                        let node = Node {
                            value: Value::Seq(items),
                            loc,
                        };
                        if anchor != 0 {
                            anchors.insert(anchor, node.clone());
                        }
                        node
                    }
                    Some(Frame::Map(loc, anchor, entries, _)) => {
                        let node = Node {
                            value: Value::Map(merge_keys(entries)),
                            loc,
                        };
                        if anchor != 0 {
                            anchors.insert(anchor, node.clone());
                        }
                        node
                    }
                    None => continue,
                };
                Some(node)
            }
        };
        let Some(node) = done else { continue };
        // An entry of a section (top-level map -> section map -> entry) goes to the sink.
        if let [
            Frame::Map(_, _, _, Some(section)),
            Frame::Map(_, _, entries, pending),
        ] = stack.as_mut_slice()
        {
            match pending.take() {
                Some(key) => entries.extend(sink(section, key, node)),
                None => *pending = Some(node),
            }
            continue;
        }
        match stack.last_mut() {
            Some(Frame::Seq(_, _, items)) => items.push(node),
            Some(Frame::Map(_, _, entries, pending)) => match pending.take() {
                Some(key) => entries.push((key, node)),
                None => *pending = Some(node),
            },
            None => root = Some(node),
        }
    }
    Ok(root.unwrap_or(Node {
        value: Value::Null,
        loc: Loc {
            file,
            line: 1,
            col: 1,
            len: 0,
        },
    }))
}

enum Frame {
    Seq(Loc, usize, Vec<Node>),
    /// Entries so far and a key waiting for its value.
    Map(Loc, usize, Vec<(Node, Node)>, Option<Node>),
}

fn loc_of(span: &Span, file: u32) -> Loc {
    let (s, e) = (span.start, span.end);
    let len = if e.line() == s.line() {
        e.col().saturating_sub(s.col())
    } else {
        1
    };
    Loc {
        file,
        line: s.line() as u32,
        col: s.col() as u32 + 1,
        len: len as u32,
    }
}

/// YAML 1.2 core schema for plain scalars, minus octal and sexagesimal surprises.
fn plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    let first = digits.as_bytes().first().copied();
    if matches!(first, Some(b'0'..=b'9')) {
        let leading_zero = digits.len() > 1 && digits.starts_with('0') && !digits.starts_with("0.");
        if digits.bytes().all(|b| b.is_ascii_digit()) && !leading_zero {
            if let Ok(i) = s.parse::<i64>() {
                return Value::Int(i, s.into());
            }
        } else if let Some(hex) = digits.strip_prefix("0x") {
            if let Ok(i) = i64::from_str_radix(hex, 16) {
                return Value::Int(if s.starts_with('-') { -i } else { i }, s.into());
            }
        } else if !leading_zero
            && digits
                .bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
            && let Ok(f) = s.parse::<f64>()
        {
            return Value::Float(f, s.into());
        }
    }
    Value::Str(s.to_owned())
}

/// `<<: *base` merges the base mapping's entries that the mapping does not set itself.
fn merge_keys(entries: Vec<(Node, Node)>) -> Vec<(Node, Node)> {
    if !entries
        .iter()
        .any(|(k, _)| matches!(&k.value, Value::Str(s) if s == "<<"))
    {
        return entries;
    }
    let mut own = Vec::with_capacity(entries.len());
    let mut merged = Vec::new();
    for (k, v) in entries {
        if matches!(&k.value, Value::Str(s) if s == "<<") {
            match v.value {
                Value::Map(m) => merged.extend(m),
                Value::Seq(items) => {
                    for item in items {
                        if let Value::Map(m) = item.value {
                            merged.extend(m);
                        }
                    }
                }
                _ => own.push((k, v)),
            }
        } else {
            own.push((k, v));
        }
    }
    for (k, v) in merged {
        let exists = own
            .iter()
            .any(|(ok, _)| ok.scalar_text() == k.scalar_text());
        if !exists {
            own.push((k, v));
        }
    }
    own
}

// ---------------------------------------------------------------------------
// Deserializing wire types out of a node, with errors that carry positions.

/// An error while turning a node into a wire type. `loc` is set by the innermost node
/// that saw the failure, so it points at the exact key or value.
#[derive(Debug, Clone)]
pub struct DeError(pub Box<DeErrorInfo>);

/// What went wrong; boxed in [`DeError`] to keep every `Result` of the hot path small.
#[derive(Debug, Clone)]
pub struct DeErrorInfo {
    pub message: String,
    pub loc: Option<Loc>,
    /// For unknown fields: the field and the accepted names, for "did you mean".
    pub unknown: Option<(String, Vec<&'static str>)>,
    /// The key whose value failed, set by the innermost mapping.
    pub field: Option<String>,
    /// Another place that takes part (the first of two duplicate keys).
    pub note: Option<(String, Loc)>,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl std::ops::Deref for DeError {
    type Target = DeErrorInfo;
    fn deref(&self) -> &DeErrorInfo {
        &self.0
    }
}

impl std::ops::DerefMut for DeError {
    fn deref_mut(&mut self) -> &mut DeErrorInfo {
        &mut self.0
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(Box::new(DeErrorInfo {
            message: msg.to_string(),
            loc: None,
            unknown: None,
            field: None,
            note: None,
        }))
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError(Box::new(DeErrorInfo {
            message: format!("unknown field `{field}`"),
            loc: None,
            unknown: Some((field.to_string(), expected.to_vec())),
            field: None,
            note: None,
        }))
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError(Box::new(DeErrorInfo {
            message: format!("invalid value `{variant}`"),
            loc: None,
            unknown: Some((variant.to_string(), expected.to_vec())),
            field: None,
            note: None,
        }))
    }
    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        let found = match unexp {
            de::Unexpected::Map => "a mapping".to_string(),
            de::Unexpected::Seq => "a list".to_string(),
            de::Unexpected::Unit => "nothing (null)".to_string(),
            other => other.to_string(),
        };
        DeError::custom(format!(
            "wrong type: expected {}, found {found}",
            plain_expected(exp)
        ))
    }
    fn invalid_value(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        DeError::custom(format!(
            "invalid value: {unexp}, expected {}",
            plain_expected(exp)
        ))
    }
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        DeError::custom(format!(
            "wrong number of items ({len}): expected {}",
            plain_expected(exp)
        ))
    }
    fn duplicate_field(field: &'static str) -> Self {
        DeError::custom(format!("duplicate key `{field}`"))
    }
}

impl DeError {
    fn at(mut self, loc: Loc) -> Self {
        if self.loc.is_none() {
            self.loc = Some(loc);
        }
        self
    }
}

/// serde names types the Rust way ("u16", "a sequence"); say it the YAML way.
fn plain_expected(exp: &dyn de::Expected) -> String {
    let e = exp.to_string();
    match e.as_str() {
        "u8" | "u16" | "u32" | "u64" | "usize" => match e.as_str() {
            "u16" => "a whole number from 0 to 65535".into(),
            "u8" => "a whole number from 0 to 255".into(),
            _ => "a whole number of 0 or more".into(),
        },
        "i8" | "i16" | "i32" | "i64" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a string" | "a boolean" => e,
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        _ if e.starts_with("struct ") => "a mapping".into(),
        _ if e.starts_with("a sequence") => "a list".into(),
        _ => e,
    }
}

/// Magic struct name through which [`crate::source::Sp`] asks for its node's location.
pub(crate) const SPANNED: &str = "$fleetwave::Spanned";
pub(crate) const SPANNED_FIELDS: &[&str] = &["$loc", "$value"];

/// Deserialize `T` from a node.
pub fn from_node<'a, T: Deserialize<'a>>(node: &'a Node) -> Result<T, DeError> {
    T::deserialize(node)
}

impl<'de> de::Deserializer<'de> for &'de Node {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i, _) => visitor.visit_i64(*i),
            Value::Float(f, _) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Seq(items) => visitor.visit_seq(NodeSeq { iter: items.iter() }),
            Value::Map(entries) => {
                check_duplicate_keys(entries)?;
                visitor.visit_map(NodeMap {
                    iter: entries.iter(),
                    value: None,
                    key: None,
                })
            }
        };
        r.map_err(|e| e.at(self.loc))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
        .map_err(|e| e.at(self.loc))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.value {
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Int(..) | Value::Float(..) | Value::Bool(_) => {
                // A label value of 12 or true is meant as text.
                visitor.visit_string(self.scalar_text().unwrap_or_default())
            }
            _ => return self.deserialize_any(visitor),
        }
        .map_err(|e: DeError| e.at(self.loc))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor
            .visit_newtype_struct(self)
            .map_err(|e| e.at(self.loc))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name == SPANNED {
            return visitor.visit_map(SpannedAccess {
                node: self,
                state: 0,
            });
        }
        let _ = fields;
        match &self.value {
            // serde would take a list as the fields in order; in YAML that is a mistake.
            Value::Map(_) => self.deserialize_any(visitor),
            other => Err(DeError::custom(format!(
                "wrong type: expected a mapping, found {}",
                other.kind()
            ))
            .at(self.loc)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.value {
            Value::Str(_) | Value::Int(..) | Value::Bool(_) => {
                let text = self.scalar_text().unwrap_or_default();
                visitor.visit_enum(text.into_deserializer())
            }
            Value::Map(entries) if entries.len() == 1 => visitor.visit_enum(NodeEnum {
                key: &entries[0].0,
                value: &entries[0].1,
            }),
            other => Err(DeError::custom(format!(
                "wrong type: expected one of the allowed names, found {}",
                other.kind()
            ))),
        }
        .map_err(|e: DeError| e.at(self.loc))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        bytes byte_buf unit unit_struct seq tuple tuple_struct map
    }
}

struct NodeSeq<'a> {
    iter: std::slice::Iter<'a, Node>,
}

impl<'de> SeqAccess<'de> for NodeSeq<'de> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.iter.next() {
            Some(n) => seed.deserialize(n).map(Some),
            None => Ok(None),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// YAML keys are unique; a repeated one is almost always a paste gone wrong.
fn check_duplicate_keys(entries: &[(Node, Node)]) -> Result<(), DeError> {
    for (i, (k, _)) in entries.iter().enumerate().skip(1) {
        let Some(text) = k.scalar_str() else {
            continue;
        };
        if let Some((first, _)) = entries[..i]
            .iter()
            .find(|(p, _)| p.scalar_str() == Some(text))
        {
            let mut e = DeError::custom(format!("duplicate key `{text}`"));
            e.loc = Some(k.loc);
            e.note = Some(("first here".into(), first.loc));
            return Err(e);
        }
    }
    Ok(())
}

struct NodeMap<'a> {
    iter: std::slice::Iter<'a, (Node, Node)>,
    value: Option<&'a Node>,
    /// The key of the value being read, to name the field in errors.
    key: Option<&'a Node>,
}

impl<'de> MapAccess<'de> for NodeMap<'de> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.iter.next() {
            Some((k, v)) => {
                self.value = Some(v);
                self.key = Some(k);
                seed.deserialize(k).map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some(v) => seed.deserialize(v).map_err(|mut e| {
                if e.field.is_none() {
                    e.field = self.key.and_then(Node::scalar_text);
                }
                e
            }),
            None => Err(DeError::custom("value requested before key")),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct NodeEnum<'a> {
    key: &'a Node,
    value: &'a Node,
}

impl<'de> de::EnumAccess<'de> for NodeEnum<'de> {
    type Error = DeError;
    type Variant = NodeVariant<'de>;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, NodeVariant<'de>), DeError> {
        let v = seed.deserialize(self.key)?;
        Ok((v, NodeVariant { value: self.value }))
    }
}

struct NodeVariant<'a> {
    value: &'a Node,
}

impl<'de> de::VariantAccess<'de> for NodeVariant<'de> {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self.value)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(self.value, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(self.value, visitor)
    }
}

/// Feeds a [`crate::source::Sp`] its location, then its value.
struct SpannedAccess<'a> {
    node: &'a Node,
    state: u8,
}

impl<'de> MapAccess<'de> for SpannedAccess<'de> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let key = match self.state {
            0 => SPANNED_FIELDS[0],
            1 => SPANNED_FIELDS[1],
            _ => return Ok(None),
        };
        seed.deserialize(key.into_deserializer()).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        self.state += 1;
        if self.state == 1 {
            seed.deserialize(self.node.loc.pack().into_deserializer())
        } else {
            seed.deserialize(self.node)
        }
    }
}
