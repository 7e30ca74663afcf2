//! DenseNet for ImageNet-sized inputs (`model.type imagenet`): the 7x7/2 stem (2k channels,
//! conv-BN-ReLU, 3x3/2 max-pool), four dense blocks of `n_blocks` layers (the CIFAR form's
//! layers, dropout and compression), transitions after the first three (`stage{i}.transition`),
//! then `bn_last` (no ReLU in the reference), global average pooling and `fc`
//! (`models/imagenet/densenet.py`). n_blocks [6, 12, 24, 16] with k = 32 is DenseNet-121.

use crate::model::{dense_stages, Config, Stage, SECTION};
use imgclf_plugin_api::nn::{BatchNorm2d, ImageNetStem, Linear, ParamStore};
use imgclf_plugin_api::{ConfigView, Model, ModelContext, NamedTensor, Result};
use tch::Tensor;

/// `model.densenet.relu_before_pool` (imgclf's, off in the reference).
pub fn relu_before_pool(c: &ConfigView) -> Result<bool> {
    c.bool(&format!("{SECTION}.relu_before_pool"))
}

pub struct DenseNet {
    store: ParamStore,
    stem: ImageNetStem,
    stages: Vec<Stage>,
    bn_last: BatchNorm2d,
    relu_before_pool: bool,
    fc: Linear,
    description: String,
}

impl DenseNet {
    /// `cfg.depth` is not used: `n_blocks` sets the depth.
    pub fn new(
        cfg: &Config,
        n_blocks: [i64; 4],
        relu_before_pool: bool,
        ctx: &ModelContext,
    ) -> Result<Self> {
        let k = cfg.growth_rate;
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let mut c = 2 * k;
        let stem = ImageNetStem::new(&root, ctx.n_channels, c, cfg.init_mode);
        let stages = dense_stages(&root, &mut c, &n_blocks, cfg);
        let bn_last = BatchNorm2d::new(&root.sub("bn_last"), c);
        let fc = Linear::new(&root.sub("fc"), c, ctx.n_classes, cfg.init_mode);
        let description = format!(
            "ImageNet DenseNet-{} (k={k}, {} layers {n_blocks:?}, compression {}, {c} final \
             channels{})",
            if cfg.bottleneck { 2 } else { 1 } * n_blocks.iter().sum::<i64>() + 5,
            if cfg.bottleneck {
                "bottleneck"
            } else {
                "basic"
            },
            cfg.compression_rate,
            if relu_before_pool {
                ", ReLU before the pooling"
            } else {
                ""
            }
        );
        Ok(DenseNet {
            store,
            stem,
            stages,
            bn_last,
            relu_before_pool,
            fc,
            description,
        })
    }
}

impl Model for DenseNet {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.stem.forward(x, train)?;
        for stage in &self.stages {
            y = stage.forward(&y, train);
        }
        let y = if self.relu_before_pool {
            self.bn_last.forward_relu(&y, train)
        } else {
            self.bn_last.forward(&y, train)
        };
        self.fc.forward_pooled(&y)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}
