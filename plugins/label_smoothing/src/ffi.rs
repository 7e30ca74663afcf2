//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "label_smoothing",
    description: "Label smoothing (arXiv:1512.00567): train on (1 - epsilon) * target + epsilon / classes",
);
