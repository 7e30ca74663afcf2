//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "trivialaugment",
    description: "TrivialAugment Wide (arXiv:2103.10158): one random operation at a random magnitude per image, in the data loader",
);
