//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "mixup",
    description: "Mixup (arXiv:1710.09412): convex combinations of image pairs and their labels",
);
