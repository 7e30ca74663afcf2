//! Typed, schema-checked configuration in the spirit of yacs: defaults, then YAML files, then
//! dotted command-line overrides, then derived values, then frozen.
//!
//! The host declares its own keys ([`host_schema`]); each plugin adds the keys of its own
//! section to the same [`Schema`]. Unknown keys, wrong types, values outside the choices and
//! non-default values of keys imgclf does not support yet are errors that name the dotted key,
//! where the value came from and, for typos, the closest valid keys.

mod builder;
mod error;
mod frozen;
mod host;
mod reference;
mod schema;
mod value;

#[cfg(test)]
mod tests;

pub use builder::ConfigBuilder;
pub use error::{ConfigError, Source};
pub use frozen::Config;
pub use host::host_schema;
pub use reference::{reference_plugin_keys, NOT_INSTALLED};
pub use schema::{IntRange, KeySpec, Schema, HOST_OWNER};
pub use value::{Value, ValueType};
