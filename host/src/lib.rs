//! The imgclf host: plugin discovery, configuration, datasets, the training loop and the
//! commands of the `imgclf` binary.

pub mod allocator;
pub mod check;
pub mod cli;
pub mod config;
pub mod confusion;
pub mod cuda;
pub mod curves;
pub mod datasets;
pub mod dist;
pub mod envinfo;
pub mod evaluate;
pub mod io;
pub mod logging;
pub mod lr_schedule;
pub mod new_plugin;
pub mod pickle;
pub mod plot;
pub mod predict;
pub mod preview;
pub mod provenance;
pub mod registry;
pub mod resume;
pub mod setup;
pub mod tensorboard;
pub mod threads;
pub mod throughput;
pub mod torch_file;
pub mod train;
