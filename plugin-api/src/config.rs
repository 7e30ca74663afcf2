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

/// Inclusive bounds of an integer key, or of every element of an integer list key; `None` on a
/// side means unbounded there. The host checks them when it freezes the config, before any work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntRange {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

impl IntRange {
    /// `min..` (e.g. a depth, a batch size).
    pub fn at_least(min: i64) -> Self {
        IntRange {
            min: Some(min),
            max: None,
        }
    }

    /// `min..=max`.
    pub fn between(min: i64, max: i64) -> Self {
        IntRange {
            min: Some(min),
            max: Some(max),
        }
    }

    /// Any i64 (stated, so that "no bound" is a decision and not an omission).
    pub fn any() -> Self {
        IntRange::default()
    }

    pub fn contains(&self, v: i64) -> bool {
        self.min.is_none_or(|m| v >= m) && self.max.is_none_or(|m| v <= m)
    }

    /// As the JSON description carries it: `[min, max]`, `null` for an open side.
    pub fn to_json(&self) -> Value {
        serde_json::json!([self.min, self.max])
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        let side = |x: &Value| -> Option<Option<i64>> {
            match x {
                Value::Null => Some(None),
                other => other.as_i64().map(Some),
            }
        };
        match v.as_array()?.as_slice() {
            [min, max] => Some(IntRange {
                min: side(min)?,
                max: side(max)?,
            }),
            _ => None,
        }
    }
}

/// `>= 1`, `<= 5`, `1 to 10`, `any integer`.
impl std::fmt::Display for IntRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.max) {
            (Some(a), Some(b)) => write!(f, "{a} to {b}"),
            (Some(a), None) => write!(f, ">= {a}"),
            (None, Some(b)) => write!(f, "<= {b}"),
            (None, None) => f.write_str("any integer"),
        }
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
    /// Allowed values of an `int` key (each element of a `list[int]` key). Every integer key
    /// should declare one; descriptions without it (older plugins) accept any integer.
    pub range: Option<IntRange>,
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
            range: None,
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
    /// Restricts an `int` key (each element of a `list[int]` key) to `range`.
    pub fn range(mut self, range: IntRange) -> Self {
        self.range = Some(range);
        self
    }
    /// Shorthand for `range(IntRange::at_least(min))`.
    pub fn at_least(self, min: i64) -> Self {
        self.range(IntRange::at_least(min))
    }

    /// The key as the JSON component description carries it (`range` only when declared).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({"key": self.key, "type": self.ty.to_text(),
            "default": self.default, "choices": self.choices, "help": self.help});
        if let Some(r) = &self.range {
            v["range"] = r.to_json();
        }
        v
    }

    /// Reads [`KeyDecl::to_json`]'s form; `Err` names the malformed part.
    pub fn from_json(k: &Value) -> std::result::Result<Self, &'static str> {
        let ty = k
            .get("type")
            .and_then(Value::as_str)
            .and_then(KeyType::parse)
            .ok_or("key type")?;
        let range = match k.get("range") {
            None | Some(Value::Null) => None,
            Some(r) => Some(IntRange::from_json(r).ok_or("key range")?),
        };
        Ok(KeyDecl {
            key: k
                .get("key")
                .and_then(Value::as_str)
                .ok_or("key name")?
                .to_string(),
            ty,
            default: k.get("default").cloned().unwrap_or(Value::Null),
            choices: k
                .get("choices")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            help: k
                .get("help")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            range,
        })
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

/// A type a config key can have in [`config_section!`]: how it is declared and read back.
pub trait KeyValue: Sized {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl;
    fn read(view: &ConfigView, key: &str) -> Result<Self>;
}

impl KeyValue for bool {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl {
        KeyDecl::bool(key, default, help)
    }
    fn read(view: &ConfigView, key: &str) -> Result<Self> {
        view.bool(key)
    }
}

impl KeyValue for i64 {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl {
        KeyDecl::int(key, default, help)
    }
    fn read(view: &ConfigView, key: &str) -> Result<Self> {
        view.int(key)
    }
}

impl KeyValue for f64 {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl {
        KeyDecl::float(key, default, help)
    }
    fn read(view: &ConfigView, key: &str) -> Result<Self> {
        view.float(key)
    }
}

impl KeyValue for String {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl {
        KeyDecl::str(key, &default, help)
    }
    fn read(view: &ConfigView, key: &str) -> Result<Self> {
        view.str(key)
    }
}

impl KeyValue for Vec<bool> {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl {
        KeyDecl::bool_list(key, &default, help)
    }
    fn read(view: &ConfigView, key: &str) -> Result<Self> {
        view.bool_list(key)
    }
}

impl KeyValue for Vec<i64> {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl {
        KeyDecl::int_list(key, &default, help)
    }
    fn read(view: &ConfigView, key: &str) -> Result<Self> {
        view.int_list(key)
    }
}

impl KeyValue for Vec<f64> {
    fn decl(key: &str, default: Self, help: &str) -> KeyDecl {
        KeyDecl::float_list(key, &default, help)
    }
    fn read(view: &ConfigView, key: &str) -> Result<Self> {
        view.float_list(key)
    }
}

/// The one-line help of a key from its doc comment lines (for [`config_section!`]).
#[doc(hidden)]
pub fn doc_help(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Declares a component's config section once, as a struct: each field is a key (its doc
/// comment is the help line, `= default`, then any [`KeyDecl`] modifiers such as
/// `at_least(1)` or `choices(&["a", "b"])`). Generates the struct, `SECTION`, `keys()` (the
/// declarations for `ComponentInfo::keys`) and `from_view()` (every key read back typed), so no
/// key name is spelt twice. Field types: `bool`, `i64`, `f64`, `String` and `Vec`s of the first
/// three ([`KeyValue`]). No ABI change: it produces the same [`KeyDecl`]s as writing them out.
///
/// ```
/// imgclf_plugin_api::config_section! {
///     /// `model.mynet.*`.
///     pub struct Keys in "model.mynet" {
///         /// network depth
///         depth: i64 = 20, at_least(2);
///         /// residual block
///         block_type: String = "basic", choices(&["basic", "bottleneck"]);
///         /// widths per stage
///         widths: Vec<i64> = vec![16, 32, 64], at_least(1);
///     }
/// }
/// let keys = Keys::keys();
/// assert_eq!(keys[0].key, "model.mynet.depth");
/// assert_eq!(keys[0].help, "network depth");
/// let view = imgclf_plugin_api::ConfigView::new(serde_json::json!(
///     {"model": {"mynet": {"depth": 32, "block_type": "basic", "widths": [8]}}}));
/// let k = Keys::from_view(&view).unwrap();
/// assert_eq!((k.depth, k.widths), (32, vec![8]));
/// ```
#[macro_export]
macro_rules! config_section {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident in $section:literal {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr $(, $modifier:ident ( $($arg:expr),* ))* ;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq)]
        $vis struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl $name {
            /// The config section these keys live in.
            pub const SECTION: &'static str = $section;

            /// Every key's declaration, in field order.
            pub fn keys() -> ::std::vec::Vec<$crate::KeyDecl> {
                ::std::vec![ $(
                    <$ty as $crate::config::KeyValue>::decl(
                        &::std::format!("{}.{}", $section, ::std::stringify!($field)),
                        ($default).into(),
                        &$crate::config::doc_help(&[$($doc),*] as &[&str]),
                    ) $( .$modifier($($arg),*) )*
                ),* ]
            }

            /// Every key read back from the frozen config, typed.
            pub fn from_view(view: &$crate::ConfigView) -> $crate::Result<Self> {
                ::std::result::Result::Ok($name { $(
                    $field: <$ty as $crate::config::KeyValue>::read(
                        view,
                        &::std::format!("{}.{}", $section, ::std::stringify!($field)),
                    )?,
                )* })
            }
        }
    };
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
    fn key_declarations_round_trip_through_json_with_and_without_a_range() {
        let k = KeyDecl::int("model.x.depth", 20, "depth").at_least(2);
        let v = k.to_json();
        assert_eq!(v["range"], serde_json::json!([2, null]));
        let back = KeyDecl::from_json(&v).unwrap();
        assert_eq!(back.range, Some(IntRange::at_least(2)));
        assert_eq!(
            (back.key.as_str(), back.ty),
            ("model.x.depth", KeyType::Int)
        );
        // A description from an older plugin has no range: any integer.
        let mut old = v.clone();
        old.as_object_mut().unwrap().remove("range");
        assert_eq!(KeyDecl::from_json(&old).unwrap().range, None);
        old["range"] = serde_json::json!([1]);
        assert_eq!(KeyDecl::from_json(&old).unwrap_err(), "key range");
        let r = IntRange::between(0, 10);
        assert!(r.contains(0) && r.contains(10) && !r.contains(-1) && !r.contains(11));
        assert_eq!(r.to_string(), "0 to 10");
        assert_eq!(IntRange::at_least(1).to_string(), ">= 1");
        assert!(IntRange::any().contains(i64::MIN));
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

    crate::config_section! {
        /// A section for the test.
        pub struct TestKeys in "model.t" {
            /// network depth,
            /// on two lines
            depth: i64 = 20, at_least(2);
            /// block
            block_type: String = "basic", choices(&["basic", "bottleneck"]);
            rate: f64 = 0.5;
            /// per stage
            stages: Vec<bool> = vec![true, false];
        }
    }

    #[test]
    fn a_section_declares_its_keys_once_and_reads_them_back_typed() {
        let keys = TestKeys::keys();
        let old = [
            KeyDecl::int("model.t.depth", 20, "network depth, on two lines").at_least(2),
            KeyDecl::str("model.t.block_type", "basic", "block").choices(&["basic", "bottleneck"]),
            KeyDecl::float("model.t.rate", 0.5, ""),
            KeyDecl::bool_list("model.t.stages", &[true, false], "per stage"),
        ];
        assert_eq!(keys.len(), old.len());
        for (a, b) in keys.iter().zip(&old) {
            assert_eq!(a.to_json(), b.to_json());
        }
        assert_eq!(TestKeys::SECTION, "model.t");
        let v = ConfigView::new(serde_json::json!({"model": {"t": {"depth": 32,
            "block_type": "bottleneck", "rate": 1, "stages": [false]}}}));
        let k = TestKeys::from_view(&v).unwrap();
        assert_eq!(
            k,
            TestKeys {
                depth: 32,
                block_type: "bottleneck".into(),
                rate: 1.0,
                stages: vec![false]
            }
        );
        let e = TestKeys::from_view(&ConfigView::new(serde_json::json!({}))).unwrap_err();
        assert!(e.0.contains("model.t.depth"), "{e}");
    }
}
