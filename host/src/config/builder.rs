//! Merges defaults, YAML files, command-line overrides and derived values, in that order, into
//! a frozen [`Config`], checking every key, type, choice and "not supported yet" on the way.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::{ConfigError, Source};
use super::frozen::Config;
use super::schema::{KeySpec, Schema};
use super::value::{parse_literal, python_quote, NotLiteral, Value, ValueType};

/// A config under construction. Every merge step is all-or-nothing: when it fails, the values
/// are as they were before, and the error lists every problem of that step.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    schema: Schema,
    values: BTreeMap<String, (Value, Source)>,
}

/// A value as it arrives, before it is checked against the key's type.
enum Incoming {
    /// Text to decode as a Python literal (command line, YAML strings).
    Text(String),
    /// An already-typed value; `text` is how it was written, if it was written.
    Typed { value: Value, text: Option<String> },
    /// `None` / YAML null.
    Null,
}

impl ConfigBuilder {
    /// Starts from every key's default.
    pub fn new(schema: Schema) -> Self {
        let values = schema
            .keys()
            .map(|spec| (spec.key.clone(), (spec.default.clone(), Source::Default)))
            .collect();
        ConfigBuilder { schema, values }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Merges a YAML file of nested mappings, like yacs `merge_from_file`.
    pub fn merge_yaml_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::ReadFile {
            path: path.to_path_buf(),
            error,
        })?;
        self.merge_yaml_str(&text, Source::File(path.to_path_buf()))
    }

    /// Merges YAML text; `source` is recorded for every key it sets and named in errors.
    pub fn merge_yaml_str(&mut self, text: &str, source: Source) -> Result<(), ConfigError> {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Yaml {
                origin: source.clone(),
                message: e.to_string(),
            })?;
        let mapping = match doc {
            serde_yaml_ng::Value::Null => return Ok(()),
            serde_yaml_ng::Value::Mapping(mapping) => mapping,
            other => {
                return Err(ConfigError::Yaml {
                    origin: source,
                    message: format!(
                        "the document must be a mapping of sections (like `train: {{batch_size: 64}}`), got {}",
                        yaml_kind(&other)
                    ),
                })
            }
        };
        let mut updates = Vec::new();
        let mut errors = Vec::new();
        self.collect_mapping("", &mapping, &source, &mut updates, &mut errors);
        self.apply(updates, errors, source)
    }

    /// Merges `KEY VALUE` pairs, like yacs `merge_from_list`; values are decoded as Python
    /// literals and fall back to the bare string.
    pub fn merge_overrides(&mut self, args: &[String]) -> Result<(), ConfigError> {
        if args.len() % 2 == 1 {
            let hint = if let Some(arg) = args.iter().find(|a| a.contains('=')) {
                Some(format!("write `KEY VALUE` as two arguments, not `{arg}`"))
            } else {
                args.last().map(|last| format!("`{last}` has no value"))
            };
            return Err(ConfigError::OddOverrides {
                count: args.len(),
                hint,
            });
        }
        let origin = Source::CommandLine;
        let mut updates = Vec::new();
        let mut errors = Vec::new();
        for pair in args.chunks(2) {
            let key = pair[0].trim();
            match self
                .schema
                .resolve(key, &origin)
                .and_then(|spec| convert(spec, Incoming::Text(pair[1].clone()), &origin))
            {
                Ok(value) => updates.push((key.to_string(), value)),
                Err(e) => errors.push(e),
            }
        }
        self.apply(updates, errors, origin)
    }

    /// Sets one key (for derived values, restored checkpoints, tests).
    pub fn set(&mut self, key: &str, value: Value, source: Source) -> Result<(), ConfigError> {
        let spec = self.schema.resolve(key, &source)?;
        let value = convert(spec, Incoming::Typed { value, text: None }, &source)?;
        self.values.insert(key.to_string(), (value, source));
        Ok(())
    }

    /// The current value, e.g. to compute derived values before [`ConfigBuilder::build`].
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key).map(|(value, _)| value)
    }

    /// Where the current value came from.
    pub fn source(&self, key: &str) -> Option<&Source> {
        self.values.get(key).map(|(_, source)| source)
    }

    /// Checks choices, integer ranges and "not supported yet" for every key, then freezes. Unsupported keys
    /// are refused only at a non-default value that a user set (file or command line);
    /// imgclf may set them internally (`Derived`, `Checkpoint`).
    pub fn build(self) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        for spec in self.schema.keys() {
            let (value, source) = &self.values[&spec.key];
            if !spec.choices.is_empty() && !spec.choices.contains(value) {
                errors.push(ConfigError::NotAChoice {
                    spec: Box::new(spec.clone()),
                    got: value.clone(),
                    origin: source.clone(),
                });
            } else if !spec.out_of_range(value).is_empty() {
                errors.push(ConfigError::OutOfRange {
                    spec: Box::new(spec.clone()),
                    value: value.clone(),
                    origin: source.clone(),
                });
            } else if !spec.supported && source.is_user() && *value != spec.default {
                errors.push(ConfigError::Unsupported {
                    spec: Box::new(spec.clone()),
                    value: value.clone(),
                    origin: source.clone(),
                });
            }
        }
        match ConfigError::collect(errors) {
            Some(err) => Err(err),
            None => Ok(Config::new(self.schema, self.values)),
        }
    }

    fn apply(
        &mut self,
        updates: Vec<(String, Value)>,
        errors: Vec<ConfigError>,
        source: Source,
    ) -> Result<(), ConfigError> {
        if let Some(err) = ConfigError::collect(errors) {
            return Err(err);
        }
        for (key, value) in updates {
            self.values.insert(key, (value, source.clone()));
        }
        Ok(())
    }

    fn collect_mapping(
        &self,
        prefix: &str,
        mapping: &serde_yaml_ng::Mapping,
        origin: &Source,
        updates: &mut Vec<(String, Value)>,
        errors: &mut Vec<ConfigError>,
    ) {
        for (name, node) in mapping {
            let name = match name {
                serde_yaml_ng::Value::String(s) => s.clone(),
                other => {
                    let place = if prefix.is_empty() {
                        "the top level".to_string()
                    } else {
                        format!("`{prefix}`")
                    };
                    errors.push(ConfigError::Yaml {
                        origin: origin.clone(),
                        message: format!("keys must be names, got {} in {place}", yaml_kind(other)),
                    });
                    continue;
                }
            };
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            let incoming = match node {
                serde_yaml_ng::Value::Mapping(inner) => {
                    if self.schema.contains_section(&path) {
                        self.collect_mapping(&path, inner, origin, updates, errors);
                    } else if let Some(spec) = self.schema.get(&path) {
                        errors.push(type_error(spec, "a mapping".to_string(), None, origin));
                    } else {
                        // Report an unknown section once, not once per key inside it.
                        let probe = match inner.keys().next() {
                            Some(serde_yaml_ng::Value::String(first)) => format!("{path}.{first}"),
                            _ => path.clone(),
                        };
                        if let Err(e) = self.schema.resolve(&probe, origin) {
                            errors.push(e);
                        }
                    }
                    continue;
                }
                // An empty section (`train:` with everything commented out) sets nothing.
                serde_yaml_ng::Value::Null if self.schema.contains_section(&path) => continue,
                serde_yaml_ng::Value::Null => Incoming::Null,
                serde_yaml_ng::Value::String(s) => Incoming::Text(s.clone()),
                other => match yaml_to_value(other) {
                    Ok(value) => Incoming::Typed {
                        value,
                        text: yaml_scalar_text(other),
                    },
                    Err(problem) => {
                        errors.push(match self.schema.resolve(&path, origin) {
                            Err(e) => e,
                            Ok(spec) => match problem {
                                YamlProblem::ContainsNull => none_error(spec, origin),
                                YamlProblem::Shape(kind) => type_error(spec, kind, None, origin),
                            },
                        });
                        continue;
                    }
                },
            };
            match self
                .schema
                .resolve(&path, origin)
                .and_then(|spec| convert(spec, incoming, origin))
            {
                Ok(value) => updates.push((path, value)),
                Err(e) => errors.push(e),
            }
        }
    }
}

/// Checks an incoming value against `spec` and converts it to the key's type.
fn convert(spec: &KeySpec, incoming: Incoming, origin: &Source) -> Result<Value, ConfigError> {
    match incoming {
        Incoming::Null => Err(none_error(spec, origin)),
        Incoming::Text(text) => {
            let trimmed = text.trim();
            match (parse_literal(&text), &spec.ty) {
                (Err(NotLiteral::ContainsNone), _) if trimmed == "None" => {
                    Err(none_error(spec, origin))
                }
                (Err(NotLiteral::ContainsNone), _) => Err(type_error(
                    spec,
                    python_quote(trimmed),
                    Some("None is not a value in imgclf".to_string()),
                    origin,
                )),
                // A string key takes the text as written, unless it is a quoted string literal.
                (Ok(Value::Str(s)), ValueType::Str) => Ok(Value::Str(s)),
                (Ok(Value::List(_)), ValueType::Str) => Err(type_error(
                    spec,
                    trimmed.to_string(),
                    quote_hint(trimmed),
                    origin,
                )),
                (_, ValueType::Str) => Ok(Value::Str(trimmed.to_string())),
                (Ok(value), ty) => value
                    .coerce(ty)
                    .ok_or_else(|| mismatch(spec, &value, origin)),
                (Err(NotLiteral::Syntax), _) => {
                    Err(type_error(spec, python_quote(trimmed), None, origin))
                }
            }
        }
        Incoming::Typed { value, text } => match (&spec.ty, &value, text) {
            (ValueType::Str, Value::Bool(_) | Value::Int(_) | Value::Float(_), Some(text)) => {
                Ok(Value::Str(text))
            }
            _ => value
                .coerce(&spec.ty)
                .ok_or_else(|| mismatch(spec, &value, origin)),
        },
    }
}

fn mismatch(spec: &KeySpec, got: &Value, origin: &Source) -> ConfigError {
    let hint = match (&spec.ty, got) {
        (ValueType::Int, Value::Float(x)) if x.fract() == 0.0 && x.is_finite() => Some(format!(
            "integers are written without a decimal point: {}",
            *x as i64
        )),
        (ValueType::List(_), Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Str(_)) => {
            Some("write a list as [a, b] or a tuple as (a, b)".to_string())
        }
        (ValueType::Bool, Value::Int(0 | 1)) => Some("write True or False".to_string()),
        _ => None,
    };
    type_error(spec, got.to_string(), hint, origin)
}

fn quote_hint(text: &str) -> Option<String> {
    Some(format!(
        "to pass this text as a string, quote it: \"{}\"",
        python_quote(text)
    ))
}

fn type_error(spec: &KeySpec, got: String, hint: Option<String>, origin: &Source) -> ConfigError {
    ConfigError::WrongType {
        spec: Box::new(spec.clone()),
        got,
        hint,
        origin: origin.clone(),
    }
}

fn none_error(spec: &KeySpec, origin: &Source) -> ConfigError {
    ConfigError::NoneValue {
        spec: Box::new(spec.clone()),
        origin: origin.clone(),
    }
}

enum YamlProblem {
    ContainsNull,
    Shape(String),
}

/// A YAML scalar or sequence as a value; strings inside sequences are decoded as literals.
fn yaml_to_value(node: &serde_yaml_ng::Value) -> Result<Value, YamlProblem> {
    use serde_yaml_ng::Value as Y;
    match node {
        Y::Null => Err(YamlProblem::ContainsNull),
        Y::Bool(b) => Ok(Value::Bool(*b)),
        Y::Number(n) => match n.as_i64() {
            Some(i) => Ok(Value::Int(i)),
            None => n
                .as_f64()
                .map(Value::Float)
                .ok_or_else(|| YamlProblem::Shape(format!("the number {n}"))),
        },
        Y::String(s) => match parse_literal(s) {
            Ok(value) => Ok(value),
            Err(NotLiteral::ContainsNone) => Err(YamlProblem::ContainsNull),
            Err(NotLiteral::Syntax) => Ok(Value::Str(s.trim().to_string())),
        },
        Y::Sequence(items) => items
            .iter()
            .map(yaml_to_value)
            .collect::<Result<Vec<_>, _>>()
            .map(Value::List),
        other => Err(YamlProblem::Shape(yaml_kind(other))),
    }
}

/// How a YAML scalar was written, so a string key can take `dataset_dir: 2024` as "2024".
fn yaml_scalar_text(node: &serde_yaml_ng::Value) -> Option<String> {
    match node {
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn yaml_kind(node: &serde_yaml_ng::Value) -> String {
    use serde_yaml_ng::Value as Y;
    match node {
        Y::Null => "null".to_string(),
        Y::Bool(b) => format!("the boolean {b}"),
        Y::Number(n) => format!("the number {n}"),
        Y::String(s) => format!("the string {}", python_quote(s)),
        Y::Sequence(_) => "a list".to_string(),
        Y::Mapping(_) => "a mapping".to_string(),
        Y::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}
