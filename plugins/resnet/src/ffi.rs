//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "resnet",
    description: "ResNet (He et al., Deep Residual Learning for Image Recognition)",
);
