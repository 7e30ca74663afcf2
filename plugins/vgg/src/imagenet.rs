//! VGG for ImageNet-sized inputs (`model.type imagenet`): the CIFAR form's five conv stages,
//! then the paper's classifier on the flattened last map: `fc1` and `fc2` (4096 units, ReLU,
//! dropout 0.5 in training) and `fc3` (`models/imagenet/vgg.py`). The default stages with BN
//! are VGG-16 with BN (torchvision's vgg16_bn at 224x224; without BN, vgg16).

use crate::model::{final_side, stages, Config, Stage};
use imgclf_plugin_api::nn::{Linear, ParamStore};
use imgclf_plugin_api::{Model, ModelContext, NamedTensor, Result};
use tch::Tensor;

/// Units of the two hidden fully connected layers.
const HIDDEN: i64 = 4096;
/// Dropout probability before `fc2` and `fc3` (PyTorch's `F.dropout` default).
const DROPOUT: f64 = 0.5;

pub struct Vgg {
    store: ParamStore,
    stages: Vec<Stage>,
    fcs: [Linear; 3],
    description: String,
}

impl Vgg {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let side = final_side(ctx.image_size)?;
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let (stages, c_last) = stages(&root, cfg, ctx);
        let features = c_last * side * side;
        let fc = |i: usize, c_in: i64, c_out: i64| {
            Linear::new(&root.sub(format!("fc{i}")), c_in, c_out, cfg.init_mode)
        };
        let fcs = [
            fc(1, features, HIDDEN),
            fc(2, HIDDEN, HIDDEN),
            fc(3, HIDDEN, ctx.n_classes),
        ];
        let convs = cfg.n_layers.iter().sum::<i64>();
        let description = format!(
            "ImageNet VGG-{}{} (stages of {:?}, channels {:?}, {features} features, \
             {HIDDEN}-{HIDDEN} classifier)",
            convs + 3,
            if cfg.use_bn { " with BN" } else { "" },
            cfg.n_layers,
            cfg.n_channels
        );
        Ok(Vgg {
            store,
            stages,
            fcs,
            description,
        })
    }
}

impl Model for Vgg {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.shallow_clone();
        for stage in &self.stages {
            y = stage.forward(&y, train)?;
        }
        let [fc1, fc2, fc3] = &self.fcs;
        let y = fc1
            .f_forward(&y.flatten(1, -1))?
            .relu_()
            .dropout(DROPOUT, train);
        let y = fc2.forward(&y).relu_().dropout(DROPOUT, train);
        Ok(fc3.forward(&y))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}
