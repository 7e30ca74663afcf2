//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "densenet",
    description: "DenseNet and DenseNet-BC (Huang et al., Densely Connected Convolutional Networks)",
);
