//! The post-activation ResNet for ImageNet-sized inputs (`model.type imagenet`): the 7x7/2
//! stem with a 3x3/2 max-pool, four stages of `n_blocks` blocks, global average pooling and
//! `fc`, with the reference's state-dict names (`models/imagenet/resnet.py`). The default
//! `n_blocks` [2, 2, 2, 2] with basic blocks is ResNet-18, [3, 4, 6, 3] ResNet-34.

use crate::model::{Block, Config};
use imgclf_plugin_api::nn::{self, ImageNetStem, Linear, ParamStore};
use imgclf_plugin_api::{Model, ModelContext, NamedTensor, Result};
use tch::Tensor;

pub struct ResNet {
    store: ParamStore,
    stem: ImageNetStem,
    stages: Vec<Vec<Block>>,
    fc: Linear,
    description: String,
}

impl ResNet {
    /// `cfg.depth` is not used: `n_blocks` sets the depth.
    pub fn new(cfg: &Config, n_blocks: [i64; 4], ctx: &ModelContext) -> Result<Self> {
        let e = if cfg.bottleneck { 4 } else { 1 };
        let c0 = cfg.initial_channels;
        // As the reference: the first stage keeps the stem's width (also with bottlenecks).
        let widths = [c0, c0 * 2 * e, c0 * 4 * e, c0 * 8 * e];
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let stem = ImageNetStem::new(&root, ctx.n_channels, c0, cfg.init_mode);
        let stages = nn::stages_of(&root, c0, &widths, &[1, 2, 2, 2], &n_blocks, |s, at| {
            Block::new(
                s,
                at.c_in,
                at.c_out,
                at.stride,
                cfg.bottleneck,
                cfg.init_mode,
            )
        });
        let fc = Linear::new(&root.sub("fc"), widths[3], ctx.n_classes, cfg.init_mode);
        let per_block = if cfg.bottleneck { 3 } else { 2 };
        let description = format!(
            "ImageNet ResNet-{} ({} blocks {n_blocks:?}, channels {widths:?})",
            per_block * n_blocks.iter().sum::<i64>() + 2,
            if cfg.bottleneck {
                "bottleneck"
            } else {
                "basic"
            }
        );
        Ok(ResNet {
            store,
            stem,
            stages,
            fc,
            description,
        })
    }
}

impl Model for ResNet {
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
