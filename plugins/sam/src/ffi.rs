//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "sam",
    description: "Sharpness-Aware Minimization (SAM, ASAM) as a training-step hook (train.step sam)",
);
