//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "random_erasing",
    description: "Random Erasing (arXiv:1708.04896): erase one random rectangle per image",
);
