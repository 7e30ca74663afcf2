//! imgclf's plugin interface: the traits a plugin implements, the layers models are built from,
//! and the stable ABI (`abi_stable`) through which the host loads plugins at run time.
//!
//! A plugin author writes plain Rust against [`component`] (factories for models, augmentations,
//! optimizers and schedulers), registers each factory with [`register!`], and exports the plugin
//! from one thin `ffi.rs` with [`export_plugin!`]. Everything that crosses the boundary lives in
//! [`ffi`] and [`tensor`]; no other module knows about `abi_stable`.
//!
//! # ABI evolution rule
//! The root module ([`ffi::PluginMod`]) and every trait object in [`ffi`] are prefix types: new
//! fields and methods are only ever appended *below* the one marked `#[sabi(last_prefix_field)]`,
//! which never moves within a major version. A plugin built against a newer minor version then
//! loads in an older host, and the host refuses plugins whose interface it cannot read.
//! Every change is recorded in `plugin-api/CHANGELOG.md`.

pub mod amp;
pub mod augment;
pub mod component;
pub mod config;
pub mod error;
pub mod ffi;
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

/// Version of this interface; host and plugin must agree on major.minor.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The libtorch release the pinned `tch` (=0.24.0) is built against. A plugin compiled against
/// another libtorch would share tensors with a different C++ library: the host refuses it.
pub const LIBTORCH_VERSION: &str = "2.11.0";
