//! Fuzz target: config YAML (`ConfigBuilder::merge_yaml_str` over the host's schema), as
//! `--config FILE` reads it: merged or a config error, never a panic.
#![no_main]

use imgclf::config::{host_schema, ConfigBuilder, Source};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut builder = ConfigBuilder::new(host_schema());
    let _ = builder.merge_yaml_str(text, Source::File(PathBuf::from("fuzz.yaml")));
});
