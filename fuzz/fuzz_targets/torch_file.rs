//! Fuzz target: the `torch.save` reader (`imgclf::torch_file::load_state_dict`, zip and legacy
//! formats) on arbitrary bytes: a state dict or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = imgclf::torch_file::sniff(data);
    let _ = imgclf::torch_file::load_state_dict(Path::new("fuzz.pth"), data);
});
