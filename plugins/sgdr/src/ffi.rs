//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "sgdr",
    description: "SGDR cosine annealing with warm restarts (scheduler.T0, scheduler.T_mul)",
);
