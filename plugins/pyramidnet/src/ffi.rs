//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "pyramidnet",
    description: "PyramidNet (Han et al., Deep Pyramidal Residual Networks)",
);
