//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "randaugment",
    description: "RandAugment (arXiv:1909.13719): num_ops random operations at one magnitude per image, in the data loader",
);
