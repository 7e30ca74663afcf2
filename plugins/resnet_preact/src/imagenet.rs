//! The pre-activation ResNet for ImageNet-sized inputs (`model.type imagenet`): the 7x7/2 stem
//! (conv-BN-ReLU, 3x3/2 max-pool), four stages of `n_blocks` pre-activation blocks with the
//! CIFAR form's options (`preact_stage` has four entries here), then `bn_last`-ReLU, global
//! average pooling and `fc` (`models/imagenet/resnet_preact.py`).

use crate::model::{Block, Config};
use imgclf_plugin_api::nn::{self, BatchNorm2d, ImageNetStem, Linear, ParamStore};
use imgclf_plugin_api::{Model, ModelContext, NamedTensor, Result};
use tch::Tensor;

pub struct ResNetPreact {
    store: ParamStore,
    stem: ImageNetStem,
    stages: Vec<Vec<Block>>,
    bn_last: BatchNorm2d,
    fc: Linear,
    description: String,
}

impl ResNetPreact {
    /// `cfg.depth` is not used: `n_blocks` sets the depth; `cfg.preact_stage` has 4 entries.
    pub fn new(cfg: &Config, n_blocks: [i64; 4], ctx: &ModelContext) -> Result<Self> {
        let e = cfg.block_type.expansion();
        let c0 = cfg.initial_channels;
        let widths = [c0, c0 * 2 * e, c0 * 4 * e, c0 * 8 * e];
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let stem = ImageNetStem::new(&root, ctx.n_channels, c0, cfg.init_mode);
        let stages = nn::stages_of(&root, c0, &widths, &[1, 2, 2, 2], &n_blocks, |s, at| {
            let preact = at.is_first() && cfg.preact_stage.get(at.stage) == Some(&true);
            Block::new(s, at.c_in, at.c_out, at.stride, cfg, preact)
        });
        let bn_last = BatchNorm2d::new(&root.sub("bn_last"), widths[3]);
        let fc = Linear::new(&root.sub("fc"), widths[3], ctx.n_classes, cfg.init_mode);
        let description = format!(
            "ImageNet ResNet-preact ({:?} blocks {n_blocks:?}, channels {widths:?}, \
             remove_first_relu {}, add_last_bn {}, preact_stage {:?})",
            cfg.block_type, cfg.remove_first_relu, cfg.add_last_bn, cfg.preact_stage
        );
        Ok(ResNetPreact {
            store,
            stem,
            stages,
            bn_last,
            fc,
            description,
        })
    }
}

impl Model for ResNetPreact {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.stem.forward(x, train)?;
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        let y = self.bn_last.forward_relu(&y, train);
        self.fc.forward_pooled(&y)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}
