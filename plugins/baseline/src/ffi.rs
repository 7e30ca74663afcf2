//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "baseline",
    description: "The reference's baseline recipe: SGD; constant, multistep, linear and cosine schedules; random crop and flip",
);
