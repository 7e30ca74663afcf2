//! The frozen configuration: typed getters, per-key sources, JSON sections for plugins, and
//! YAML output that merges back to the same config.

use std::collections::BTreeMap;

use super::error::Source;
use super::schema::{is_under, KeySpec, Schema};
use super::value::{parse_literal, python_quote, NotLiteral, Value};

/// An immutable, fully checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    schema: Schema,
    values: BTreeMap<String, (Value, Source)>,
}

impl Config {
    pub(crate) fn new(schema: Schema, values: BTreeMap<String, (Value, Source)>) -> Self {
        Config { schema, values }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key).map(|(value, _)| value)
    }

    /// Where the value of `key` came from.
    pub fn source(&self, key: &str) -> Option<&Source> {
        self.values.get(key).map(|(_, source)| source)
    }

    /// # Panics
    /// If `key` is not a boolean key of the schema (a programming error).
    pub fn bool(&self, key: &str) -> bool {
        match self.expect(key) {
            Value::Bool(b) => *b,
            other => self.wrong_getter(key, "bool", other),
        }
    }

    /// # Panics
    /// If `key` is not an integer key of the schema.
    pub fn int(&self, key: &str) -> i64 {
        match self.expect(key) {
            Value::Int(i) => *i,
            other => self.wrong_getter(key, "int", other),
        }
    }

    /// Integer keys are accepted too.
    ///
    /// # Panics
    /// If `key` is not a numeric key of the schema.
    pub fn float(&self, key: &str) -> f64 {
        match self.expect(key) {
            Value::Float(x) => *x,
            Value::Int(i) => *i as f64,
            other => self.wrong_getter(key, "float", other),
        }
    }

    /// # Panics
    /// If `key` is not a string key of the schema.
    pub fn str(&self, key: &str) -> &str {
        match self.expect(key) {
            Value::Str(s) => s,
            other => self.wrong_getter(key, "str", other),
        }
    }

    /// # Panics
    /// If `key` is not a list key of the schema.
    pub fn list(&self, key: &str) -> &[Value] {
        match self.expect(key) {
            Value::List(items) => items,
            other => self.wrong_getter(key, "list", other),
        }
    }

    /// A list of integers, e.g. `scheduler.milestones`.
    ///
    /// # Panics
    /// If `key` is not a list-of-integers key of the schema.
    pub fn int_list(&self, key: &str) -> Vec<i64> {
        self.list(key)
            .iter()
            .map(|item| match item {
                Value::Int(i) => *i,
                other => self.wrong_getter(key, "list of int", other),
            })
            .collect()
    }

    /// A list of numbers (integers accepted), e.g. `optim.adam.betas`.
    ///
    /// # Panics
    /// If `key` is not a list-of-numbers key of the schema.
    pub fn float_list(&self, key: &str) -> Vec<f64> {
        self.list(key)
            .iter()
            .map(|item| match item {
                Value::Float(x) => *x,
                Value::Int(i) => *i as f64,
                other => self.wrong_getter(key, "list of float", other),
            })
            .collect()
    }

    /// Every key and value, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.values
            .iter()
            .map(|(key, (value, _))| (key.as_str(), value))
    }

    /// The keys whose value differs from the default, with where each came from.
    pub fn changed(&self) -> impl Iterator<Item = (&KeySpec, &Value, &Source)> {
        self.schema.keys().filter_map(move |spec| {
            let (value, source) = &self.values[&spec.key];
            (*value != spec.default).then_some((spec, value, source))
        })
    }

    /// The subtree under `prefix` as a nested JSON object, e.g. `model.resnet_preact` ->
    /// `{"depth": 110, ...}`; `""` gives the whole config and a single key gives its value.
    /// An unknown prefix gives an empty object.
    pub fn section_json(&self, prefix: &str) -> serde_json::Value {
        if let Some(value) = self.get(prefix) {
            return value.to_json();
        }
        let mut root = serde_json::Map::new();
        for (key, value) in self.iter() {
            let relative = if prefix.is_empty() {
                key
            } else if is_under(key, prefix) {
                &key[prefix.len() + 1..]
            } else {
                continue;
            };
            let mut node = &mut root;
            let mut segments = relative.split('.').peekable();
            while let Some(segment) = segments.next() {
                if segments.peek().is_none() {
                    node.insert(segment.to_string(), value.to_json());
                } else {
                    node = node
                        .entry(segment.to_string())
                        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()))
                        .as_object_mut()
                        .expect("a schema section is never also a key");
                }
            }
        }
        serde_json::Value::Object(root)
    }

    /// Every key as nested YAML, sorted; merging it into a builder with the same schema gives
    /// back an equal config.
    pub fn to_yaml(&self) -> String {
        let mut root = serde_yaml_ng::Mapping::new();
        for (key, value) in self.iter() {
            let mut node = &mut root;
            let mut segments = key.split('.').peekable();
            while let Some(segment) = segments.next() {
                let name = serde_yaml_ng::Value::String(segment.to_string());
                if segments.peek().is_none() {
                    node.insert(name, to_yaml_value(value));
                } else {
                    node = match node.entry(name).or_insert_with(|| {
                        serde_yaml_ng::Value::Mapping(serde_yaml_ng::Mapping::new())
                    }) {
                        serde_yaml_ng::Value::Mapping(inner) => inner,
                        _ => unreachable!("a schema section is never also a key"),
                    };
                }
            }
        }
        serde_yaml_ng::to_string(&root).expect("plain values always serialise to YAML")
    }

    fn expect(&self, key: &str) -> &Value {
        match self.get(key) {
            Some(value) => value,
            None => panic!("config key `{key}` is not in the schema (a programming error in imgclf or a plugin)"),
        }
    }

    fn wrong_getter(&self, key: &str, getter: &str, value: &Value) -> ! {
        let ty = self
            .schema
            .get(key)
            .map(|spec| spec.ty.to_string())
            .unwrap_or_default();
        panic!("config key `{key}` is a {ty} key holding {value}; it cannot be read as {getter}")
    }
}

fn to_yaml_value(value: &Value) -> serde_yaml_ng::Value {
    match value {
        Value::Bool(b) => serde_yaml_ng::Value::Bool(*b),
        Value::Int(i) => serde_yaml_ng::Value::Number((*i).into()),
        Value::Float(x) => serde_yaml_ng::Value::Number((*x).into()),
        Value::Str(s) => serde_yaml_ng::Value::String(yaml_safe_string(s)),
        Value::List(items) => {
            serde_yaml_ng::Value::Sequence(items.iter().map(to_yaml_value).collect())
        }
    }
}

/// Strings are decoded as Python literals when merged, as in yacs; a string that would decode
/// to something else (`'x'`, `[1]`, `None`, ` padded `) is written as a quoted literal.
fn yaml_safe_string(s: &str) -> String {
    match parse_literal(s) {
        Err(NotLiteral::Syntax) if s.trim() == s => s.to_string(),
        _ => python_quote(s),
    }
}
