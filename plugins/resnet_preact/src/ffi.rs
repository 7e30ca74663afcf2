//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "resnet_preact",
    description: "Pre-activation ResNet (He et al., Identity Mappings in Deep Residual Networks)",
);
