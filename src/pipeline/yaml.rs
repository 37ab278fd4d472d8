//! YAML parsing that keeps source positions.
//!
//! Pipelines are parsed into a `serde_json::Value` (which typed deserialization then consumes)
//! plus an index from each value's path (`stages.a.with.outs[0]`) to where it stands in the file,
//! so that every later error can point at a `line:col`.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Yaml;

/// A 1-based line and column in a source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn from_marker(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

/// Where a value (and, for a mapping entry, its key) stands in the source.
#[derive(Clone, Copy, Debug, Default)]
pub struct Span {
    pub key: Option<Pos>,
    pub value: Pos,
}

/// A parsed document and the positions of all its values, keyed by path.
#[derive(Debug, Default)]
pub struct Document {
    pub value: Value,
    pub spans: HashMap<String, Span>,
}

impl Document {
    /// The position of the value at `path`, or of its closest ancestor that has one.
    pub fn value_pos(&self, path: &str) -> Pos {
        self.lookup(path, |s| s.value)
    }

    /// The position of the key of the entry at `path` (the value's if it has no key).
    pub fn key_pos(&self, path: &str) -> Pos {
        self.lookup(path, |s| s.key.unwrap_or(s.value))
    }

    fn lookup(&self, path: &str, pick: impl Fn(&Span) -> Pos) -> Pos {
        let mut p = path;
        loop {
            if let Some(span) = self.spans.get(p) {
                return pick(span);
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.spans.get("").map(|s| s.value).unwrap_or_default(),
            }
        }
    }
}

/// A YAML syntax error.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Joins a parent path and a mapping key the way error paths are written.
pub fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

pub fn index_path(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// The path, below `base`, of the value a deserialization error is about, written as error
/// paths are (`stages.train.with.C`, `models[0]`).
pub fn error_path(base: &str, at: &serde_path_to_error::Path) -> String {
    let mut path = base.to_string();
    for seg in at.iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => path = index_path(&path, *index),
            serde_path_to_error::Segment::Map { key } => path = child_path(&path, key),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    path
}

/// The most a file may hold: pipeline and settings files are a few kilobytes.
const MAX_BYTES: usize = 4 << 20;
/// Deepest nesting of sequences and mappings.
const MAX_DEPTH: usize = 64;
/// Most values a document may expand to, aliases counted with all they repeat.
const MAX_NODES: usize = 1_000_000;

/// Parses one YAML document, with limits on size, nesting and alias expansion, so that no file
/// can exhaust memory or the stack; a NUL byte or a second document is an error, not silently
/// the end of the file.
pub fn parse(src: &str) -> Result<Document, SyntaxError> {
    let pos_of = |byte: usize| {
        let before = &src[..byte];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Pos { line, col }
    };
    if src.len() > MAX_BYTES {
        return Err(SyntaxError {
            pos: Pos { line: 1, col: 1 },
            message: format!("the file has {} bytes; at most {MAX_BYTES} are read", src.len()),
        });
    }
    if let Some(nul) = src.find('\0') {
        return Err(SyntaxError {
            pos: pos_of(nul),
            message: "a NUL byte: YAML files are text".into(),
        });
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    // Events one at a time: yaml-rust2's `load` recurses once per nesting level.
    loop {
        let (event, mark) = parser.next_token().map_err(|e| SyntaxError {
            pos: Pos::from_marker(*e.marker()),
            message: e.info().to_string(),
        })?;
        if event == Event::StreamEnd {
            break;
        }
        builder.on_event(event, mark);
        if let Some(err) = builder.error.take() {
            return Err(err);
        }
    }
    let value = builder.root.unwrap_or(Value::Null);
    let mut spans = builder.spans;
    // A block mapping's start event is marked after its first key; the document's own position
    // reads better as that first key's.
    if let Value::Object(map) = &value {
        let first = map
            .keys()
            .filter_map(|k| spans.get(k.as_str()).and_then(|s| s.key))
            .min_by_key(|p| (p.line, p.col));
        if let Some(pos) = first {
            spans.insert(String::new(), Span { key: None, value: pos });
        }
    }
    Ok(Document { value, spans })
}

enum Frame {
    Seq {
        path: String,
        items: Vec<Value>,
        anchor: usize,
    },
    Map {
        path: String,
        entries: Map<String, Value>,
        key: Option<(String, Pos)>,
        anchor: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Value>,
    spans: HashMap<String, Span>,
    /// Anchored values with the number of values each holds.
    anchors: HashMap<usize, (Value, usize)>,
    /// Values built so far, aliases counted with everything they repeat.
    nodes: usize,
    documents: usize,
    error: Option<SyntaxError>,
}

impl Builder {
    /// The path the next value will have, and the position of its key if it is a mapping value.
    fn next_path(&self) -> (String, Option<Pos>) {
        match self.stack.last() {
            None => (String::new(), None),
            Some(Frame::Seq { path, items, .. }) => (index_path(path, items.len()), None),
            Some(Frame::Map {
                path,
                key: Some((k, pos)),
                ..
            }) => (child_path(path, k), Some(*pos)),
            Some(Frame::Map { key: None, .. }) => (String::new(), None),
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }

    fn fail(&mut self, pos: Pos, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { pos, message });
        }
    }

    fn push_value(&mut self, value: Value, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, (value.clone(), count_nodes(&value)));
        }
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map { entries, key, .. }) => {
                if let Some((k, _)) = key.take() {
                    entries.insert(k, value);
                }
            }
        }
    }
}

/// The values in `value`, itself included.
fn count_nodes(value: &Value) -> usize {
    let mut count = 0;
    let mut todo = vec![value];
    while let Some(v) = todo.pop() {
        count += 1;
        match v {
            Value::Array(items) => todo.extend(items),
            Value::Object(map) => todo.extend(map.values()),
            _ => {}
        }
    }
    count
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        if matches!(
            ev,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
        ) {
            self.nodes += 1;
        }
        match ev {
            Event::Scalar(text, style, anchor, _) => {
                if self.expecting_key() {
                    let Some(Frame::Map { entries, key, .. }) = self.stack.last_mut() else {
                        unreachable!("expecting_key checked the frame")
                    };
                    let duplicate = entries.contains_key(&text);
                    *key = Some((text.clone(), pos));
                    if duplicate {
                        self.fail(pos, format!("duplicate key `{text}`"));
                    }
                    return;
                }
                let (path, key) = self.next_path();
                self.spans.insert(path, Span { key, value: pos });
                match scalar(&text, style) {
                    Ok(value) => self.push_value(value, anchor),
                    Err(message) => self.fail(pos, message),
                }
            }
            Event::Alias(id) => {
                if self.expecting_key() {
                    self.fail(pos, "aliases cannot be used as keys".into());
                    return;
                }
                let (path, key) = self.next_path();
                self.spans.insert(path, Span { key, value: pos });
                let (value, nodes) = self.anchors.get(&id).cloned().unwrap_or((Value::Null, 1));
                self.nodes += nodes;
                if self.nodes > MAX_NODES {
                    self.fail(
                        pos,
                        format!("aliases expand the document past {MAX_NODES} values: write it out instead"),
                    );
                    return;
                }
                self.push_value(value, 0);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if self.expecting_key() {
                    self.fail(pos, "keys must be plain strings, not collections".into());
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.fail(pos, format!("nested more than {MAX_DEPTH} levels deep"));
                    return;
                }
                let (path, key) = self.next_path();
                self.spans.insert(path.clone(), Span { key, value: pos });
                let frame = if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq {
                        path,
                        items: Vec::new(),
                        anchor,
                    }
                } else {
                    Frame::Map {
                        path,
                        entries: Map::new(),
                        key: None,
                        anchor,
                    }
                };
                self.stack.push(frame);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { items, anchor, .. }) => (Value::Array(items), anchor),
                    Some(Frame::Map { entries, anchor, .. }) => (Value::Object(entries), anchor),
                    None => return,
                };
                self.push_value(value, anchor);
            }
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(
                        pos,
                        "a second YAML document: a file holds one (remove the `---`)".into(),
                    );
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Resolves a scalar with YAML 1.2 core-schema rules: only plain scalars can be numbers,
/// booleans or null. An integer too large for 64 bits is an error rather than a rounded float.
fn scalar(text: &str, style: TScalarStyle) -> Result<Value, String> {
    if style != TScalarStyle::Plain {
        return Ok(Value::String(text.to_string()));
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && text.parse::<i64>().is_err() {
        return Err(format!(
            "`{text}` is too large for an integer (at most {}): quote it to keep it as text",
            i64::MAX
        ));
    }
    Ok(match Yaml::from_str(text) {
        Yaml::Integer(i) => Value::Number(i.into()),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_string())),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Null => Value::Null,
        _ => Value::String(text.to_string()),
    })
}

/// Writes a JSON value as block-style YAML (used for the lock file).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
    emitter
        .dump(&to_yaml_node(value))
        .expect("writing YAML to a String cannot fail");
    // The emitter starts documents with `---`; a lock file reads better without it.
    let body = out.strip_prefix("---\n").unwrap_or(&out);
    format!("{body}\n")
}

fn to_yaml_node(value: &Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(to_yaml_node).collect()),
        Value::Object(map) => Yaml::Hash(
            map.iter()
                .map(|(k, v)| (Yaml::String(k.clone()), to_yaml_node(v)))
                .collect(),
        ),
    }
}

/// Section `name` of a settings file's `doc` as `T` (`None` when the file has none), or what is
/// wrong with it and where: the pipeline's `file:line:col` reporting, for config files.
pub fn section<T: serde::de::DeserializeOwned>(doc: &Document, name: &str) -> Result<Option<T>, (Pos, String)> {
    let Some(value) = doc.value.get(name) else {
        return Ok(None);
    };
    serde_path_to_error::deserialize(value.clone())
        .map(Some)
        .map_err(|err| {
            let path = error_path(name, err.path());
            let message = err.into_inner().to_string();
            let pos = match message
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                // The error's path may already end at the unknown key.
                Some(key) => {
                    let parent = path
                        .strip_suffix(key)
                        .map_or(path.as_str(), |p| p.trim_end_matches('.'));
                    doc.key_pos(&child_path(parent, key))
                }
                None => doc.value_pos(&path),
            };
            (pos, format!("`{path}`: {message}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let doc = parse("a: 1\nb:\n  - x\n  - {c: true}\n").unwrap();
        assert_eq!(doc.value_pos("a"), Pos { line: 1, col: 4 });
        assert_eq!(doc.key_pos("a"), Pos { line: 1, col: 1 });
        assert_eq!(doc.value_pos("b[1].c"), Pos { line: 4, col: 9 });
        assert_eq!(doc.value["b"][1]["c"], Value::Bool(true));
    }

    #[test]
    fn quoted_scalars_stay_strings() {
        let doc = parse("a: '42'\nb: 42\nc: ~\nd: 1.5\n").unwrap();
        assert_eq!(doc.value["a"], Value::String("42".into()));
        assert_eq!(doc.value["b"], Value::from(42));
        assert_eq!(doc.value["c"], Value::Null);
        assert_eq!(doc.value["d"], Value::from(1.5));
    }

    #[test]
    fn hostile_documents_are_refused_where_they_go_wrong() {
        let deep = |n: usize| format!("a: {}x{}\n", "[".repeat(n), "]".repeat(n));
        let err = parse(&deep(100)).unwrap_err();
        assert!(err.message.contains("nested more than 64"), "{}", err.message);
        assert!(parse(&deep(20_000)).is_err());
        let dashes = format!("a:\n{}x\n", "- ".repeat(20_000));
        assert!(parse(&dashes).is_err(), "block nesting is bounded too");

        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, prev) in ["b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f", "g"])
        {
            bomb.push_str(&format!("{i}: &{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let err = parse(&bomb).unwrap_err();
        assert!(err.message.contains("aliases expand"), "{}", err.message);

        let err = parse("a: 1\nb: x\0y\n").unwrap_err();
        assert_eq!(
            (err.pos, err.message.as_str()),
            (Pos { line: 2, col: 5 }, "a NUL byte: YAML files are text")
        );
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(err.pos.line, 2, "{}", err.message);
        let err = parse("n: 123456789012345678901234567890\n").unwrap_err();
        assert!(err.message.contains("too large for an integer"), "{}", err.message);
        assert_eq!(
            parse("n: '123456789012345678901234567890'\n").unwrap().value["n"],
            "123456789012345678901234567890"
        );
        assert_eq!(parse("n: -9223372036854775808\n").unwrap().value["n"], i64::MIN);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.pos, Pos { line: 2, col: 1 });
    }
}
