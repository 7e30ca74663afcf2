//! ResNeXt for ImageNet-sized inputs (`model.type imagenet`): the 7x7/2 stem (conv-BN-ReLU,
//! 3x3/2 max-pool), four stages of `n_blocks` of the CIFAR form's grouped bottleneck blocks
//! (`cardinality` x `base_channels * 2^stage` wide, outputs 4, 8, 16, 32 times the initial
//! channels), global average pooling and `fc` (`models/imagenet/resnext.py`). n_blocks
//! [3, 4, 6, 3], cardinality 32, base_channels 4 is ResNeXt-50 (32x4d).

use crate::model::{Block, Config, EXPANSION};
use imgclf_plugin_api::nn::{self, ImageNetStem, Linear, ParamStore};
use imgclf_plugin_api::{Model, ModelContext, NamedTensor, Result};
use tch::Tensor;

pub struct ResNext {
    store: ParamStore,
    stem: ImageNetStem,
    stages: Vec<Vec<Block>>,
    fc: Linear,
    description: String,
}

impl ResNext {
    /// `cfg.depth` is not used: `n_blocks` sets the depth.
    pub fn new(cfg: &Config, n_blocks: [i64; 4], ctx: &ModelContext) -> Result<Self> {
        let c0 = cfg.initial_channels;
        let widths = [1, 2, 4, 8].map(|m| m * c0 * EXPANSION);
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let stem = ImageNetStem::new(&root, ctx.n_channels, c0, cfg.init_mode);
        let stages = nn::stages_of(&root, c0, &widths, &[1, 2, 2, 2], &n_blocks, |s, at| {
            Block::new(s, at.c_in, at.c_out, at.stride, at.stage as u32, cfg)
        });
        let fc = Linear::new(&root.sub("fc"), widths[3], ctx.n_classes, cfg.init_mode);
        let description = format!(
            "ImageNet ResNeXt-{} ({}x{}d, blocks {n_blocks:?}, widths {widths:?})",
            3 * n_blocks.iter().sum::<i64>() + 2,
            cfg.cardinality,
            cfg.base_channels
        );
        Ok(ResNext {
            store,
            stem,
            stages,
            fc,
            description,
        })
    }
}

impl Model for ResNext {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.stem.forward(x, train)?;
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        self.fc.forward_pooled(&y)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}
