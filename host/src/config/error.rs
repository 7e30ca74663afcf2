//! Configuration errors: every one names the dotted key (or file) and where the value came from.

use std::fmt;
use std::path::PathBuf;

use super::schema::KeySpec;
use super::value::Value;

/// Where a value came from; shown in every error and kept per key in the frozen config.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// The schema's default.
    Default,
    /// A YAML config file.
    File(PathBuf),
    /// A dotted `KEY VALUE` override on the command line.
    CommandLine,
    /// Computed by imgclf from other keys (e.g. `dataset.n_classes` from `dataset.name`).
    Derived,
    /// Restored from a checkpoint.
    Checkpoint(PathBuf),
}

impl Source {
    /// Whether a user wrote this value (as opposed to a default or an internal setting).
    pub fn is_user(&self) -> bool {
        matches!(self, Source::File(_) | Source::CommandLine)
    }

    /// "set on the command line", "set in configs/x.yaml", ...
    pub fn set_phrase(&self) -> String {
        match self {
            Source::Default => "its default".to_string(),
            Source::File(path) => format!("set in {}", path.display()),
            Source::CommandLine => "set on the command line".to_string(),
            Source::Derived => "derived by imgclf".to_string(),
            Source::Checkpoint(path) => format!("restored from checkpoint {}", path.display()),
        }
    }
}

/// The short form used in parentheses: "command line", "from configs/x.yaml".
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "from {}", path.display()),
            Source::CommandLine => f.write_str("command line"),
            Source::Derived => f.write_str("derived"),
            Source::Checkpoint(path) => write!(f, "from checkpoint {}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown config key `{key}` ({origin}){}", did_you_mean(suggestions))]
    UnknownKey {
        key: String,
        origin: Source,
        suggestions: Vec<String>,
    },

    #[error(
        "unknown config section `{section}` in `{key}` ({origin}){}{}",
        known_sections(section, known, suggestions),
        did_you_mean(suggestions)
    )]
    UnknownSection {
        key: String,
        section: String,
        origin: Source,
        /// Close full keys or sections.
        suggestions: Vec<String>,
        /// Sections that exist next to the unknown one, listed when none is close to it.
        known: Box<[String]>,
    },

    #[error("`{key}` is a section, not a single key ({origin}); set one of its keys instead, e.g. `{example}`")]
    IsSection {
        key: String,
        origin: Source,
        example: String,
    },

    #[error("`{key}` is a single key, not a section ({origin}), so `{given}` does not exist")]
    NotSection {
        key: String,
        given: String,
        origin: Source,
    },

    #[error(
        "{} expects {}, got {got} ({origin}){}; {}: {} (default {})",
        spec.key, spec.ty.describe(), hint_suffix(hint), spec.key, spec.help, spec.default
    )]
    WrongType {
        spec: Box<KeySpec>,
        got: String,
        hint: Option<String>,
        origin: Source,
    },

    #[error(
        "{} cannot be None ({origin}): imgclf keys always hold a value; {}: {} (default {})",
        spec.key, spec.key, spec.help, spec.default
    )]
    NoneValue { spec: Box<KeySpec>, origin: Source },

    #[error("{} must be one of {}, got {got} ({origin})", spec.key, join_values(&spec.choices))]
    NotAChoice {
        spec: Box<KeySpec>,
        got: Value,
        origin: Source,
    },

    #[error(
        "{} must be {}{}, got {value} ({origin}); {}: {} (default {})",
        spec.key,
        spec.range.unwrap_or_default(),
        if matches!(spec.ty, super::value::ValueType::List(_)) { " (each element)" } else { "" },
        spec.key, spec.help, spec.default
    )]
    OutOfRange {
        spec: Box<KeySpec>,
        value: Value,
        origin: Source,
    },

    #[error(
        "{} = {value} is not supported yet by {} ({}); remove it or set it back to its default {}",
        spec.key, spec.owner, origin.set_phrase(), spec.default
    )]
    Unsupported {
        spec: Box<KeySpec>,
        value: Value,
        origin: Source,
    },

    #[error("config key `{key}` is declared twice: by {first_owner} and by {second_owner}")]
    DuplicateKey {
        key: String,
        first_owner: String,
        second_owner: String,
    },

    #[error("config key `{key}` (declared by {owner}) clashes with `{other}` (declared by {other_owner}): a key cannot also be a section")]
    KeyClash {
        key: String,
        owner: String,
        other: String,
        other_owner: String,
    },

    #[error("invalid declaration of config key `{key}` by {owner}: {problem}")]
    InvalidSpec {
        key: String,
        owner: String,
        problem: String,
    },

    #[error(
        "command-line overrides must come in `KEY VALUE` pairs, got {count} item(s){}",
        hint_suffix(hint)
    )]
    OddOverrides { count: usize, hint: Option<String> },

    #[error("cannot read config file {}: {error}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },

    #[error("invalid YAML ({origin}): {message}")]
    Yaml { origin: Source, message: String },

    #[error("{} configuration errors:{}", .0.len(), bullet_list(.0))]
    Multiple(Vec<ConfigError>),
}

impl ConfigError {
    /// The dotted key the error is about, where there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. }
            | ConfigError::UnknownSection { key, .. }
            | ConfigError::IsSection { key, .. }
            | ConfigError::NotSection { given: key, .. }
            | ConfigError::DuplicateKey { key, .. }
            | ConfigError::KeyClash { key, .. }
            | ConfigError::InvalidSpec { key, .. } => Some(key),
            ConfigError::WrongType { spec, .. }
            | ConfigError::NoneValue { spec, .. }
            | ConfigError::NotAChoice { spec, .. }
            | ConfigError::OutOfRange { spec, .. }
            | ConfigError::Unsupported { spec, .. } => Some(&spec.key),
            ConfigError::OddOverrides { .. }
            | ConfigError::ReadFile { .. }
            | ConfigError::Yaml { .. }
            | ConfigError::Multiple(_) => None,
        }
    }

    /// Where the offending value came from, where that applies.
    pub fn origin(&self) -> Option<&Source> {
        match self {
            ConfigError::UnknownKey { origin, .. }
            | ConfigError::UnknownSection { origin, .. }
            | ConfigError::IsSection { origin, .. }
            | ConfigError::NotSection { origin, .. }
            | ConfigError::WrongType { origin, .. }
            | ConfigError::NoneValue { origin, .. }
            | ConfigError::NotAChoice { origin, .. }
            | ConfigError::OutOfRange { origin, .. }
            | ConfigError::Unsupported { origin, .. }
            | ConfigError::Yaml { origin, .. } => Some(origin),
            _ => None,
        }
    }

    /// The individual errors: the list for [`ConfigError::Multiple`], else just this one.
    pub fn errors(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Multiple(errors) => errors.iter().flat_map(|e| e.errors()).collect(),
            other => vec![other],
        }
    }

    /// One error as itself, several as [`ConfigError::Multiple`]; `None` when there are none.
    pub(crate) fn collect(mut errors: Vec<ConfigError>) -> Option<ConfigError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::Multiple(errors)),
        }
    }
}

fn did_you_mean(suggestions: &[String]) -> String {
    match suggestions {
        [] => String::new(),
        [one] => format!("; did you mean `{one}`?"),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(|s| format!("`{s}`")).collect();
            format!("; did you mean {} or `{last}`?", init.join(", "))
        }
    }
}

fn known_sections(section: &str, known: &[String], suggestions: &[String]) -> String {
    let parent = section
        .rsplit_once('.')
        .map(|(parent, _)| parent)
        .unwrap_or("");
    if known.is_empty() {
        return if suggestions.is_empty() && !parent.is_empty() {
            // Sections like `model.<name>` come from plugins.
            format!(
                "; `{parent}` has no sections (is the plugin that declares `{section}` loaded?)"
            )
        } else {
            String::new()
        };
    }
    let known: Vec<String> = known.iter().map(|s| format!("`{s}`")).collect();
    if parent.is_empty() {
        format!("; known top-level sections: {}", known.join(", "))
    } else {
        format!("; known sections in `{parent}`: {}", known.join(", "))
    }
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
}

fn join_values(values: &[Value]) -> String {
    values
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn bullet_list(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}
