//! Fuzz target: the restricted unpickler (`imgclf::pickle::parse`) on arbitrary bytes. Any
//! input must give a value or an error, never a panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = imgclf::pickle::parse(Path::new("fuzz.pkl"), data) {
        // Walk what the readers walk: the root as a dict and its entries' descriptions.
        if tree.root_is_dict() {
            for key in ["data", "labels", "fine_labels", "model", "state_dict"] {
                if let Some(id) = tree.dict_get(key) {
                    let _ = tree.describe(id);
                    let _ = tree.int_list(id);
                    let _ = tree.u8_array(id);
                }
            }
        }
    }
});
