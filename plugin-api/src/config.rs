//! How components declare their config keys and read the frozen configuration.
//!
//! A component owns a section (`model.resnet_preact`, `augmentation.cutout`, `optim.lars`) and
//! declares every key in it with type, default, choices and a one-line help. The host merges
//! defaults, the YAML file and command-line overrides, validates them against these
//! declarations, and hands the frozen result to the component as a [`ConfigView`].

use crate::error::{Error, Result};
use serde_json::Value;

/// The type of a config value, as the reference's yacs config types it.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyType {
    Bool,
    Int,
    Float,
    Str,
    List(Box<KeyType>),
}

impl KeyType {
    /// Stable textual form used across the ABI: `bool`, `int`, `float`, `str`, `list[int]`.
    pub fn to_text(&self) -> String {
        match self {
            KeyType::Bool => "bool".into(),
            KeyType::Int => "int".into(),
            KeyType::Float => "float".into(),
            KeyType::Str => "str".into(),
            KeyType::List(inner) => format!("list[{}]", inner.to_text()),
        }
    }

    pub fn parse(text: &str) -> Option<KeyType> {
        Some(match text {
            "bool" => KeyType::Bool,
            "int" => KeyType::Int,
            "float" => KeyType::Float,
            "str" => KeyType::Str,
            _ => {
                let inner = text.strip_prefix("list[")?.strip_suffix(']')?;
                KeyType::List(Box::new(KeyType::parse(inner)?))
            }
        })
    }
}

/// One config key a component declares.
#[derive(Clone, Debug)]
pub struct KeyDecl {
    /// Full dotted path, e.g. `model.resnet_preact.depth`.
    pub key: String,
    pub ty: KeyType,
    pub default: Value,
    /// Allowed values; empty means any value of the type.
    pub choices: Vec<Value>,
    pub help: String,
}

impl KeyDecl {
    pub fn new(
        key: impl Into<String>,
        ty: KeyType,
        default: Value,
        help: impl Into<String>,
    ) -> Self {
        KeyDecl {
            key: key.into(),
            ty,
            default,
            choices: Vec::new(),
            help: help.into(),
        }
    }
    pub fn bool(key: &str, default: bool, help: &str) -> Self {
        Self::new(key, KeyType::Bool, Value::from(default), help)
    }
    pub fn int(key: &str, default: i64, help: &str) -> Self {
        Self::new(key, KeyType::Int, Value::from(default), help)
    }
    pub fn float(key: &str, default: f64, help: &str) -> Self {
        Self::new(key, KeyType::Float, Value::from(default), help)
    }
    pub fn str(key: &str, default: &str, help: &str) -> Self {
        Self::new(key, KeyType::Str, Value::from(default), help)
    }
    pub fn bool_list(key: &str, default: &[bool], help: &str) -> Self {
        Self::new(
            key,
            KeyType::List(Box::new(KeyType::Bool)),
            Value::from(default.to_vec()),
            help,
        )
    }
    pub fn int_list(key: &str, default: &[i64], help: &str) -> Self {
        Self::new(
            key,
            KeyType::List(Box::new(KeyType::Int)),
            Value::from(default.to_vec()),
            help,
        )
    }
    pub fn float_list(key: &str, default: &[f64], help: &str) -> Self {
        Self::new(
            key,
            KeyType::List(Box::new(KeyType::Float)),
            Value::from(default.to_vec()),
            help,
        )
    }
    /// Restricts the key to these values.
    pub fn choices<T: Into<Value> + Clone>(mut self, choices: &[T]) -> Self {
        self.choices = choices.iter().cloned().map(Into::into).collect();
        self
    }
}

/// Read-only access to the frozen, validated configuration (the whole tree, not only the
/// component's section: an optimizer reads `train.momentum`, a model `dataset.n_classes`).
#[derive(Clone, Debug)]
pub struct ConfigView {
    root: Value,
}

impl ConfigView {
    pub fn new(root: Value) -> Self {
        ConfigView { root }
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map(ConfigView::new)
            .map_err(|e| {
                Error(format!(
                    "config handed over by the host is not valid JSON: {e}"
                ))
            })
    }

    pub fn json(&self) -> &Value {
        &self.root
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        let mut node = &self.root;
        for part in key.split('.') {
            node = node
                .get(part)
                .ok_or_else(|| Error(format!("config key `{key}` is missing")))?;
        }
        Ok(node)
    }

    fn typed<T>(&self, key: &str, what: &str, f: impl Fn(&Value) -> Option<T>) -> Result<T> {
        let v = self.get(key)?;
        f(v).ok_or_else(|| Error(format!("config key `{key}` should be {what}, got {v}")))
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "a bool", Value::as_bool)
    }
    pub fn int(&self, key: &str) -> Result<i64> {
        self.typed(key, "an integer", Value::as_i64)
    }
    pub fn float(&self, key: &str) -> Result<f64> {
        self.typed(key, "a number", Value::as_f64)
    }
    pub fn str(&self, key: &str) -> Result<String> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_string))
    }
    pub fn bool_list(&self, key: &str) -> Result<Vec<bool>> {
        self.typed(key, "a list of bools", |v| {
            v.as_array()?.iter().map(Value::as_bool).collect()
        })
    }
    pub fn int_list(&self, key: &str) -> Result<Vec<i64>> {
        self.typed(key, "a list of integers", |v| {
            v.as_array()?.iter().map(Value::as_i64).collect()
        })
    }
    pub fn float_list(&self, key: &str) -> Result<Vec<f64>> {
        self.typed(key, "a list of numbers", |v| {
            v.as_array()?.iter().map(Value::as_f64).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_text_round_trips() {
        for t in [
            KeyType::Bool,
            KeyType::Int,
            KeyType::Float,
            KeyType::Str,
            KeyType::List(Box::new(KeyType::List(Box::new(KeyType::Float)))),
        ] {
            assert_eq!(KeyType::parse(&t.to_text()), Some(t));
        }
        assert_eq!(KeyType::parse("list[int"), None);
    }

    #[test]
    fn view_reads_typed_values_and_names_missing_keys() {
        let v = ConfigView::new(
            serde_json::json!({"train": {"base_lr": 0.1, "batch_size": 128,
            "nesterov": true}, "model": {"x": {"stages": [true, false]}}}),
        );
        assert_eq!(v.float("train.base_lr").unwrap(), 0.1);
        assert_eq!(v.float("train.batch_size").unwrap(), 128.0);
        assert_eq!(v.int("train.batch_size").unwrap(), 128);
        assert!(v.bool("train.nesterov").unwrap());
        assert_eq!(v.bool_list("model.x.stages").unwrap(), vec![true, false]);
        let e = v.int("train.epochs").unwrap_err();
        assert!(e.0.contains("train.epochs"), "{e}");
        let e = v.int("train.base_lr").unwrap_err();
        assert!(e.0.contains("integer"), "{e}");
    }
}
