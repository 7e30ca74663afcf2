//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "lars",
    description: "LARS layer-wise adaptive rate scaling (optim.lars.*), without a LARS coefficient",
);
