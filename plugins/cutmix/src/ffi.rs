//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "cutmix",
    description: "CutMix (arXiv:1905.04899): paste a box from a partner image, mix labels by area",
);
