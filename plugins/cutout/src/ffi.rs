//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "cutout",
    description: "Cutout (arXiv:1708.04552): mask one square per image after normalisation",
);
