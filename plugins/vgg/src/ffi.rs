//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "vgg",
    description: "VGG (Simonyan and Zisserman, Very Deep Convolutional Networks), with optional BN",
);
