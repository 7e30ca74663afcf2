//! The schema: every accepted dotted key with its type, default, choices and owner, and the
//! "did you mean" lookup for keys that are not in it.

use std::collections::BTreeMap;

use super::error::{ConfigError, Source};
use super::value::{Value, ValueType};
pub use imgclf_plugin_api::config::IntRange;

/// The owner name of keys declared by the host itself.
pub const HOST_OWNER: &str = "imgclf";

/// The declaration of one config key.
#[derive(Clone, Debug)]
pub struct KeySpec {
    /// Dotted path, e.g. `model.resnet_preact.depth`.
    pub key: String,
    pub ty: ValueType,
    pub default: Value,
    /// Allowed values; empty means any value of the type.
    pub choices: Vec<Value>,
    /// One line shown in errors and `--help`-style listings.
    pub help: String,
    /// `false`: the key is accepted, but a non-default value from a file or the command line
    /// is refused with "not supported yet".
    pub supported: bool,
    /// `"imgclf"` or a plugin name.
    pub owner: String,
    /// Allowed values of an `int` key (of each element of a `list[int]` key), checked when the
    /// config is frozen. Every host integer key declares one.
    pub range: Option<IntRange>,
}

impl KeySpec {
    /// A supported key without choices, owned by imgclf.
    pub fn new(key: &str, ty: ValueType, default: Value, help: &str) -> Self {
        KeySpec {
            key: key.to_string(),
            ty,
            default,
            choices: Vec::new(),
            help: help.to_string(),
            supported: true,
            owner: HOST_OWNER.to_string(),
            range: None,
        }
    }

    /// Restricts an `int` key (each element of a `list[int]` key) to `range`.
    pub fn with_range(mut self, range: IntRange) -> Self {
        self.range = Some(range);
        self
    }

    /// The value's integers outside the key's range (empty when it has none or all fit).
    pub fn out_of_range(&self, value: &Value) -> Vec<i64> {
        let Some(range) = &self.range else {
            return Vec::new();
        };
        let mut bad = Vec::new();
        let mut visit = vec![value];
        while let Some(v) = visit.pop() {
            match v {
                Value::Int(i) if !range.contains(*i) => bad.push(*i),
                Value::List(items) => visit.extend(items.iter().rev()),
                _ => {}
            }
        }
        bad
    }

    /// Restricts the key to these values.
    pub fn with_choices<I, V>(mut self, choices: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<Value>,
    {
        self.choices = choices.into_iter().map(Into::into).collect();
        self
    }

    /// Marks the key as accepted only at its default.
    pub fn unsupported(mut self) -> Self {
        self.supported = false;
        self
    }

    /// Sets the owner (a plugin name).
    pub fn owned_by(mut self, owner: &str) -> Self {
        self.owner = owner.to_string();
        self
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Float(x)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

/// All accepted keys. The host adds its own ([`super::host_schema`]); each plugin adds the keys
/// under its section.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    specs: BTreeMap<String, KeySpec>,
    /// Every proper prefix of every key (`train`, `train.dataloader`, ...), with the owner of
    /// the key that first introduced it.
    sections: BTreeMap<String, String>,
}

impl Schema {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one key. Refuses duplicates (naming both owners), a key that is also a section,
    /// malformed paths, and a default that does not fit the type or the choices.
    pub fn add(&mut self, spec: KeySpec) -> Result<(), ConfigError> {
        let invalid = |problem: String| ConfigError::InvalidSpec {
            key: spec.key.clone(),
            owner: spec.owner.clone(),
            problem,
        };
        if spec.key.is_empty()
            || spec
                .key
                .split('.')
                .any(|seg| seg.is_empty() || seg.trim() != seg)
        {
            return Err(invalid(
                "a key is dot-separated names without spaces".to_string(),
            ));
        }
        if let Some(existing) = self.specs.get(&spec.key) {
            return Err(ConfigError::DuplicateKey {
                key: spec.key.clone(),
                first_owner: existing.owner.clone(),
                second_owner: spec.owner.clone(),
            });
        }
        if let Some(owner) = self.sections.get(&spec.key) {
            let other = self
                .keys_under(&spec.key)
                .next()
                .map(|s| s.key.clone())
                .unwrap_or_default();
            return Err(ConfigError::KeyClash {
                key: spec.key.clone(),
                owner: spec.owner.clone(),
                other,
                other_owner: owner.clone(),
            });
        }
        for prefix in prefixes(&spec.key) {
            if let Some(leaf) = self.specs.get(prefix) {
                return Err(ConfigError::KeyClash {
                    key: spec.key.clone(),
                    owner: spec.owner.clone(),
                    other: leaf.key.clone(),
                    other_owner: leaf.owner.clone(),
                });
            }
        }
        match spec.default.coerce(&spec.ty) {
            Some(d) if d == spec.default => {}
            _ => {
                return Err(invalid(format!(
                    "default {} is not {} (a {} key)",
                    spec.default,
                    spec.ty.describe(),
                    spec.ty
                )))
            }
        }
        if let Some(bad) = spec
            .choices
            .iter()
            .find(|c| c.coerce(&spec.ty).as_ref() != Some(*c))
        {
            return Err(invalid(format!(
                "choice {bad} is not {}",
                spec.ty.describe()
            )));
        }
        if spec.range.is_some() && !is_int_or_int_list(&spec.ty) {
            return Err(invalid(format!(
                "a range applies to int and list[int] keys, not to a {} key",
                spec.ty
            )));
        }
        if !spec.out_of_range(&spec.default).is_empty() {
            return Err(invalid(format!(
                "default {} is outside its range ({})",
                spec.default,
                spec.range.unwrap_or_default()
            )));
        }
        if !spec.choices.is_empty() && !spec.choices.contains(&spec.default) {
            return Err(invalid(format!(
                "default {} is not among its choices",
                spec.default
            )));
        }
        for prefix in prefixes(&spec.key) {
            self.sections
                .entry(prefix.to_string())
                .or_insert_with(|| spec.owner.clone());
        }
        self.specs.insert(spec.key.clone(), spec);
        Ok(())
    }

    /// Adds several keys, stopping at the first error.
    pub fn extend<I: IntoIterator<Item = KeySpec>>(&mut self, specs: I) -> Result<(), ConfigError> {
        specs.into_iter().try_for_each(|spec| self.add(spec))
    }

    pub fn get(&self, key: &str) -> Option<&KeySpec> {
        self.specs.get(key)
    }

    /// All keys, sorted by dotted path.
    pub fn keys(&self) -> impl Iterator<Item = &KeySpec> {
        self.specs.values()
    }

    /// The keys strictly inside `prefix` (`""` for all), sorted.
    pub fn keys_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeySpec> + 'a {
        self.specs
            .values()
            .filter(move |spec| prefix.is_empty() || is_under(&spec.key, prefix))
    }

    /// Whether `prefix` is a section, i.e. some key lies under `prefix.`.
    pub fn contains_section(&self, prefix: &str) -> bool {
        self.sections.contains_key(prefix)
    }

    /// All section paths, sorted.
    pub fn sections(&self) -> impl Iterator<Item = &str> {
        self.sections.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Looks `key` up for a value coming from `origin`; errors say what is wrong with the
    /// path and what the user probably meant.
    pub(crate) fn resolve(&self, key: &str, origin: &Source) -> Result<&KeySpec, ConfigError> {
        if let Some(spec) = self.specs.get(key) {
            return Ok(spec);
        }
        if self.contains_section(key) {
            let example = self
                .keys_under(key)
                .next()
                .map(|s| s.key.clone())
                .unwrap_or_default();
            return Err(ConfigError::IsSection {
                key: key.to_string(),
                origin: origin.clone(),
                example,
            });
        }
        if let Some(leaf) = prefixes(key).find(|p| self.specs.contains_key(*p)) {
            return Err(ConfigError::NotSection {
                key: leaf.to_string(),
                given: key.to_string(),
                origin: origin.clone(),
            });
        }
        let (parent, _) = split_last(key);
        if parent.is_empty() || self.contains_section(parent) {
            return Err(ConfigError::UnknownKey {
                key: key.to_string(),
                origin: origin.clone(),
                suggestions: self.suggest_keys(key),
            });
        }
        // Some section on the path is unknown: find the deepest known ancestor.
        let segments: Vec<&str> = key.split('.').collect();
        let mut depth = 0;
        while depth + 1 < segments.len() && self.contains_section(&segments[..=depth].join(".")) {
            depth += 1;
        }
        let ancestor = segments[..depth].join(".");
        let section = segments[..=depth].join(".");
        let rest = segments[depth + 1..].join(".");
        let siblings: Vec<&str> = self
            .sections()
            .filter(|s| split_last(s).0 == ancestor.as_str())
            .collect();
        let mut close: Vec<(f64, &str)> = siblings
            .iter()
            .map(|s| (similarity(split_last(&section).1, split_last(s).1), *s))
            .filter(|(score, _)| *score >= THRESHOLD)
            .collect();
        close.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        let mut suggestions: Vec<String> = Vec::new();
        for (_, s) in close.iter().take(MAX_SUGGESTIONS) {
            let full = format!("{s}.{rest}");
            if self.specs.contains_key(&full) {
                suggestions.push(full);
            } else {
                suggestions.push(s.to_string());
            }
        }
        let mut known: Box<[String]> = Box::default();
        if suggestions.is_empty() {
            // Nothing close: list what exists here, and look for the same key elsewhere
            // (`model.foo.depth` -> `model.resnet_preact.depth`).
            known = siblings
                .iter()
                .take(MAX_LISTED_SECTIONS)
                .map(|s| s.to_string())
                .collect();
            suggestions = self.suggest_keys(key);
        }
        Err(ConfigError::UnknownSection {
            key: key.to_string(),
            section,
            origin: origin.clone(),
            suggestions,
            known,
        })
    }

    /// Up to three keys close to an unknown `key`: by the whole dotted path, by the last
    /// segment within the same section, or the same last segment in another section.
    fn suggest_keys(&self, key: &str) -> Vec<String> {
        let (parent, last) = split_last(key);
        let mut scored: Vec<(f64, &str)> = self
            .specs
            .keys()
            .map(|candidate| {
                let (c_parent, c_last) = split_last(candidate);
                // Within the section only the last segment counts: the shared prefix would
                // make every sibling look close (`train.lr` is not `train.seed`).
                let score = if c_parent == parent {
                    similarity(last, c_last)
                } else if c_last == last {
                    0.85
                } else {
                    strsim::normalized_damerau_levenshtein(key, candidate)
                };
                (score, candidate.as_str())
            })
            .filter(|(score, _)| *score >= THRESHOLD)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        // Only those about as close as the best one.
        let best = scored.first().map_or(0.0, |(score, _)| *score);
        scored
            .into_iter()
            .take_while(|(score, _)| *score >= best - 0.1)
            .take(MAX_SUGGESTIONS)
            .map(|(_, k)| k.to_string())
            .collect()
    }
}

fn is_int_or_int_list(ty: &ValueType) -> bool {
    match ty {
        ValueType::Int => true,
        ValueType::List(inner) => is_int_or_int_list(inner),
        _ => false,
    }
}

const THRESHOLD: f64 = 0.6;
const MAX_SUGGESTIONS: usize = 3;
const MAX_LISTED_SECTIONS: usize = 20;

/// Similarity of two names in [0, 1]: edit distance, with a floor for one containing the other
/// (`lr` in `base_lr`, `batch` in `batch_size`).
fn similarity(a: &str, b: &str) -> f64 {
    let a = a.to_lowercase();
    let b = b.to_lowercase();
    let mut score = strsim::normalized_damerau_levenshtein(&a, &b);
    let (short, long) = if a.len() <= b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    if short.len() >= 2 && long.contains(short.as_str()) {
        score = score.max(0.7);
    }
    score
}

/// `a.b.c` -> `a`, `a.b` (proper prefixes, shortest first).
pub(crate) fn prefixes(key: &str) -> impl Iterator<Item = &str> {
    key.match_indices('.').map(move |(i, _)| &key[..i])
}

/// `a.b.c` -> (`a.b`, `c`); `a` -> (``, `a`).
pub(crate) fn split_last(key: &str) -> (&str, &str) {
    match key.rfind('.') {
        Some(i) => (&key[..i], &key[i + 1..]),
        None => ("", key),
    }
}

/// Whether `key` lies strictly inside section `prefix`.
pub(crate) fn is_under(key: &str, prefix: &str) -> bool {
    key.len() > prefix.len() && key.starts_with(prefix) && key.as_bytes()[prefix.len()] == b'.'
}
