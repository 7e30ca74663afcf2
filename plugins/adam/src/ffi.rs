//! The plugin's export to the imgclf host (the only place that touches the ABI).

imgclf_plugin_api::export_plugin!(
    name: "adam",
    description: "Adam and AMSGrad (torch.optim.Adam, with optim.adam.betas)",
);
