//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "adabound",
    description: "AdaBound and AdaBoundW (optim.adabound.*), as the reference's optim/adabound.py",
);
