//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "se_resnet_preact",
    description: "Squeeze-and-Excitation pre-activation ResNet (Hu et al., SENet)",
);
