//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "dual_cutout",
    description: "Dual-Cutout (arXiv:1802.07426): two Cutout views per image and a consistency loss",
);
