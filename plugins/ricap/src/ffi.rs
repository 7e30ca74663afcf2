//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "ricap",
    description: "RICAP (arXiv:1811.09030): patch four random crops into one image, mix labels by area",
);
