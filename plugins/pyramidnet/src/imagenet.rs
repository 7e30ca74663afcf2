//! PyramidNet for ImageNet-sized inputs (`model.type imagenet`): the 7x7/2 stem (conv-BN-ReLU,
//! 3x3/2 max-pool), four stages of `n_blocks` of the CIFAR form's blocks whose width grows by
//! `alpha / sum(n_blocks)` per block, then `bn_last`-ReLU, global average pooling and `fc`
//! (`models/imagenet/pyramidnet.py`). n_blocks [3, 24, 36, 3], bottleneck, alpha 300 and 64
//! initial channels is PyramidNet-200.

use crate::model::{Block, Config};
use imgclf_plugin_api::nn::{BatchNorm2d, ImageNetStem, Linear, ParamStore};
use imgclf_plugin_api::{Model, ModelContext, NamedTensor, Result};
use tch::Tensor;

pub struct PyramidNet {
    store: ParamStore,
    stem: ImageNetStem,
    stages: Vec<Vec<Block>>,
    bn_last: BatchNorm2d,
    fc: Linear,
    description: String,
}

impl PyramidNet {
    /// `cfg.depth` is not used: `n_blocks` sets the depth.
    pub fn new(cfg: &Config, n_blocks: [i64; 4], ctx: &ModelContext) -> Result<Self> {
        let total: i64 = n_blocks.iter().sum();
        let widths = cfg.widths_of(total);
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let stem = ImageNetStem::new(&root, ctx.n_channels, widths[0], cfg.init_mode);
        let mut stages = Vec::new();
        let mut k = 0usize;
        for (i, (&n, stride)) in n_blocks.iter().zip([1, 2, 2, 2]).enumerate() {
            let s = root.sub(format!("stage{}", i + 1));
            let mut blocks = Vec::new();
            for b in 0..n {
                let st = if b == 0 { stride } else { 1 };
                let name = s.sub(format!("block{}", b + 1));
                blocks.push(Block::new(&name, widths[k], widths[k + 1], st, cfg));
                k += 1;
            }
            stages.push(blocks);
        }
        let last = widths[k];
        let bn_last = BatchNorm2d::new(&root.sub("bn_last"), last);
        let fc = Linear::new(&root.sub("fc"), last, ctx.n_classes, cfg.init_mode);
        let per_block = if cfg.bottleneck { 3 } else { 2 };
        let description = format!(
            "ImageNet PyramidNet-{} (alpha {}, {} blocks {n_blocks:?}, widths {} -> {last})",
            per_block * total + 2,
            cfg.alpha,
            if cfg.bottleneck {
                "bottleneck"
            } else {
                "basic"
            },
            widths[0]
        );
        Ok(PyramidNet {
            store,
            stem,
            stages,
            bn_last,
            fc,
            description,
        })
    }
}

impl Model for PyramidNet {
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
