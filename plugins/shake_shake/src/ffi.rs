//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "shake_shake",
    description: "Shake-Shake regularization (Gastaldi) on a two-branch ResNet",
);
