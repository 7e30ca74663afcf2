//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "wrn",
    description: "Wide Residual Networks (Zagoruyko and Komodakis)",
);
