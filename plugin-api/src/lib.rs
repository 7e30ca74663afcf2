//! imgclf's plugin interface: the traits a plugin implements, the layers models are built from,
//! and the stable ABI (`abi_stable`) through which the host loads plugins at run time.
//!
//! A plugin author writes plain Rust against [`component`] (factories for models, augmentations,
//! optimizers, schedulers and training-step hooks), registers each factory with [`register!`], and exports the plugin
//! from one thin `ffi.rs` with [`export_plugin!`]. Everything that crosses the boundary lives in
//! [`ffi`] and [`tensor`]; no other module knows about `abi_stable`.
//!
//! # ABI versions
//! The ABI has its own version, [`ABI_VERSION`]: this crate's version, which does **not** follow
//! imgclf's (the workspace's) version. An imgclf release that leaves the ABI alone keeps it, and
//! keeps loading every plugin built before. Versions follow Cargo's semver rules, where for `0.y.z`
//! the `y` counts incompatible changes and the `z` compatible ones:
//!
//! - **Compatible change** (`0.1.0` -> `0.1.1`): a field appended to the root module
//!   ([`ffi::PluginMod`]) or a method appended to a trait object in [`ffi`], always *below* the
//!   one marked `#[sabi(last_prefix_field)]` (that marker never moves), and always with a graceful
//!   default for plugins that lack it (`#[sabi(missing_field(option))]` or
//!   `missing_field(default)`, never `panic`); an optional key in the JSON descriptions; any
//!   change that does not touch the ABI (helpers such as [`nn`]).
//! - **Incompatible change** (`0.1.z` -> `0.2.0`): anything else that crosses the boundary (a
//!   field or method moved, removed or retyped, a JSON key that becomes required).
//!
//! The host loads a plugin whose ABI version is compatible with its own in either direction:
//! an *older* plugin (fields it lacks take their defaults) and a *newer* one (fields the host
//! does not know are ignored). It refuses another `0.y` (or, from `1.0`, another major).
//! `tests/plugin_abi.rs` loads a fixture plugin built against the previous ABI (a frozen copy of
//! this crate at `0.1.0`, under `tests/fixtures/previous_abi/`) to keep that promise.
//!
//! Independently of the ABI, a plugin must have been built against the libtorch the host runs
//! with ([`LIBTORCH_VERSION`], read from libtorch's headers when the plugin is built; the host
//! compares it with the libtorch it has loaded, see [`ffi::runtime_libtorch_version`]).
//!
//! Every ABI change is recorded in `plugin-api/CHANGELOG.md`.

pub mod amp;
pub mod augment;
pub mod component;
pub mod config;
pub mod error;
pub mod ffi;
mod fused;
pub mod image;
pub mod nn;
pub mod optim;
pub mod rng;
mod shim;
pub mod tensor;

pub use component::*;
pub use config::{ConfigView, KeyDecl, KeyType};
pub use error::{Error, Result};

#[doc(hidden)]
pub use abi_stable;
#[doc(hidden)]
pub use inventory;
pub use tch;

/// The plugin ABI's version (see "ABI versions" above): this crate's version, independent of
/// imgclf's.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The same as [`ABI_VERSION`] (its name before the ABI had a version of its own).
pub const API_VERSION: &str = ABI_VERSION;
/// The libtorch release this crate (and so a plugin built with it) was compiled against, read
/// from the version header of the libtorch the build used (`unknown` when there was none). A
/// plugin built against another libtorch than the one loaded at run time would share tensors
/// with a different C++ library: the host refuses it.
pub const LIBTORCH_VERSION: &str = imgclf_plugin_api_build_info::LIBTORCH_VERSION;
/// The header [`LIBTORCH_VERSION`] was read from (empty when unknown).
pub const LIBTORCH_ORIGIN: &str = imgclf_plugin_api_build_info::LIBTORCH_ORIGIN;
