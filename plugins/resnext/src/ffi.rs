//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "resnext",
    description: "ResNeXt (Xie et al., Aggregated Residual Transformations)",
);
