//! The keys imgclf itself owns (the reference's `config/defaults.py` minus the sections that
//! model, augmentation and optimizer plugins declare), with defaults, choices and help lines.

use super::schema::{IntRange, KeySpec, Schema};
use super::value::{Value, ValueType};

fn boolean(key: &str, default: bool, help: &str) -> KeySpec {
    KeySpec::new(key, ValueType::Bool, Value::Bool(default), help)
}

fn int(key: &str, default: i64, help: &str) -> KeySpec {
    KeySpec::new(key, ValueType::Int, Value::Int(default), help)
}

fn float(key: &str, default: f64, help: &str) -> KeySpec {
    KeySpec::new(key, ValueType::Float, Value::Float(default), help)
}

fn string(key: &str, default: &str, help: &str) -> KeySpec {
    KeySpec::new(key, ValueType::Str, Value::Str(default.to_string()), help)
}

fn int_list(key: &str, default: &[i64], help: &str) -> KeySpec {
    let default = Value::List(default.iter().map(|&i| Value::Int(i)).collect());
    KeySpec::new(key, ValueType::list_of(ValueType::Int), default, help)
}

/// Every host-owned key. Model (`model.<name>.*`), augmentation (`augmentation.<name>.*`)
/// and optimizer (`optim.*`) keys come from the plugins.
pub fn host_schema() -> Schema {
    let specs = vec![
        // Devices.
        string("device", "cuda", "Device to train on").with_choices(["cuda", "cpu"]),
        boolean(
            "cudnn.benchmark",
            true,
            "Let cuDNN pick the fastest convolution algorithms",
        ),
        boolean(
            "cudnn.deterministic",
            false,
            "Use only deterministic cuDNN algorithms",
        )
        .unsupported(),
        // Dataset.
        string(
            "dataset.name",
            "CIFAR10",
            "Dataset to train on (a registered dataset name)",
        ),
        string(
            "dataset.dataset_dir",
            "",
            "Dataset directory; empty: derived from dataset.name",
        ),
        int(
            "dataset.image_size",
            32,
            "Input image height and width in pixels (derived from dataset.name)",
        )
        .with_range(IntRange::at_least(1)),
        int(
            "dataset.n_channels",
            3,
            "Input image channels (derived from dataset.name)",
        )
        .with_range(IntRange::at_least(1)),
        int(
            "dataset.n_classes",
            10,
            "Number of classes (derived from dataset.name)",
        )
        .with_range(IntRange::at_least(1)),
        // Model (the architecture's own keys live under model.<name>).
        string(
            "model.type",
            "cifar",
            "Model family: the reference's models/cifar/ or models/imagenet/ form of model.name",
        )
        .with_choices(["cifar", "imagenet"]),
        string(
            "model.name",
            "resnet_preact",
            "Architecture (a registered model name)",
        ),
        string(
            "model.init_mode",
            "kaiming_fan_out",
            "Kaiming initialisation mode of conv weights",
        )
        .with_choices(["kaiming_fan_out", "kaiming_fan_in"]),
        // Training.
        string(
            "train.checkpoint",
            "",
            "Initial weights (imgclf checkpoint, safetensors or torch.save file); empty: none",
        ),
        boolean(
            "train.resume",
            false,
            "Resume training from the checkpoint (set internally)",
        )
        .unsupported(),
        boolean(
            "train.use_apex",
            true,
            "Use NVIDIA apex for mixed precision",
        )
        .unsupported(),
        string(
            "train.precision",
            "O0",
            "Mixed precision as apex's opt levels, on native autocast: O0 float32; O1 autocast \
             with float32 weights; O2 reduced-precision weights with float32 masters \
             (BatchNorm float32); O3 pure reduced precision. float16 O1/O2 scale the loss \
             dynamically",
        )
        .with_choices(["O0", "O1", "O2", "O3"]),
        string(
            "train.precision_dtype",
            "float16",
            "The reduced type of train.precision O1-O3 (bfloat16: no loss scaling, fast on \
             CPUs with bfloat16 instructions)",
        )
        .with_choices(["float16", "bfloat16"]),
        int(
            "train.batch_size",
            128,
            "Training images per optimiser step",
        )
        .with_range(IntRange::at_least(1)),
        int(
            "train.subdivision",
            1,
            "Split each batch into this many sub-batches (gradient accumulation)",
        )
        .with_range(IntRange::at_least(1)),
        string(
            "train.optimizer",
            "sgd",
            "Optimiser (a registered optimiser name)",
        ),
        string(
            "train.step",
            "plain",
            "Training-step hook (a registered step component, e.g. sam); plain: one \
             forward/backward per step",
        ),
        boolean(
            "train.ema.enabled",
            false,
            "Keep an exponential moving average of the weights and buffers (timm's \
             --model-ema); model_final holds it",
        ),
        float(
            "train.ema.decay",
            0.9998,
            "EMA decay per optimizer step: ema = decay * ema + (1 - decay) * w",
        ),
        boolean(
            "train.ema.eval",
            true,
            "Validate with the EMA weights (with train.ema.enabled)",
        ),
        float("train.base_lr", 0.1, "Base learning rate"),
        float("train.momentum", 0.9, "SGD momentum"),
        boolean("train.nesterov", true, "Use Nesterov momentum"),
        float("train.weight_decay", 1e-4, "L2 weight decay"),
        boolean(
            "train.no_weight_decay_on_bn",
            false,
            "Exclude batch-norm parameters from weight decay",
        ),
        float(
            "train.gradient_clip",
            0.0,
            "Clip gradient norm to this value; 0: no clipping",
        ),
        int("train.start_epoch", 0, "Epoch to start from").with_range(IntRange::at_least(0)),
        int("train.seed", 0, "Random seed").with_range(IntRange::at_least(0)),
        int(
            "train.num_threads",
            0,
            "libtorch intra-op threads (torch.set_num_threads); 0: OMP_NUM_THREADS when set, else libtorch's default",
        )
        .with_range(IntRange::at_least(0)),
        boolean("train.val_first", true, "Validate before the first epoch"),
        int("train.val_period", 1, "Validate every this many epochs")
            .with_range(IntRange::at_least(0)),
        float(
            "train.val_ratio",
            0.0,
            "Fraction of the training set held out for validation",
        ),
        boolean("train.use_test_as_val", true, "Validate on the test set"),
        string(
            "train.output_dir",
            "experiments/exp00",
            "Directory for checkpoints, logs and the saved config",
        ),
        int("train.log_period", 100, "Log every this many iterations")
            .with_range(IntRange::at_least(1)),
        int(
            "train.checkpoint_period",
            10,
            "Save a checkpoint every this many epochs",
        )
        .with_range(IntRange::at_least(1)),
        boolean(
            "train.use_tensorboard",
            true,
            "Write TensorBoard event files (output_dir per epoch, output_dir/running per logged step)",
        ),
        int(
            "train.dataloader.num_workers",
            2,
            "Training data-loading worker threads",
        )
        .with_range(IntRange::at_least(0)),
        boolean(
            "train.dataloader.drop_last",
            true,
            "Drop the last incomplete training batch",
        ),
        boolean(
            "train.dataloader.pin_memory",
            false,
            "Pin host memory of training batches",
        ),
        boolean(
            "train.dataloader.non_blocking",
            false,
            "Copy training batches to the device asynchronously",
        ),
        string(
            "train.dataloader.on_device",
            "auto",
            "Keep the training set on the training device as uint8 and batch it there, no host \
             loader in the loop (auto: on CUDA for in-memory sets up to 4 GiB, e.g. CIFAR, MNIST)",
        )
        .with_choices(["auto", "on", "off"]),
        string(
            "train.channels_last",
            "auto",
            "Convolution weights and input batches in the channels_last (NHWC) memory format \
             (auto: on, on CUDA and on the CPU, where it is faster)",
        )
        .with_choices(["auto", "on", "off"]),
        boolean(
            "train.distributed",
            false,
            "Distributed data-parallel training (run under torchrun or imgclf train --nproc-per-node N)",
        ),
        string(
            "train.dist.backend",
            "nccl",
            "Distributed backend: nccl (CUDA tensors) or gloo (CPU)",
        )
        .with_choices(["nccl", "gloo"]),
        string(
            "train.dist.init_method",
            "env://",
            "Rendezvous: env:// (MASTER_ADDR/MASTER_PORT, as torchrun sets) or tcp://HOST:PORT",
        ),
        int(
            "train.dist.world_size",
            -1,
            "Number of distributed processes (-1: WORLD_SIZE)",
        )
        .with_range(IntRange::at_least(-1)),
        int(
            "train.dist.node_rank",
            -1,
            "Rank of this process among all (-1: RANK)",
        )
        .with_range(IntRange::at_least(-1)),
        int(
            "train.dist.local_rank",
            0,
            "Rank of this process on its node (LOCAL_RANK wins; picks the CUDA device)",
        )
        .with_range(IntRange::at_least(0)),
        boolean(
            "train.dist.use_sync_bn",
            false,
            "Synchronise batch norm across processes",
        ),
        float(
            "train.dist.timeout",
            300.0,
            "Seconds a collective waits for the other ranks before failing (naming the rank that died or hangs)",
        ),
        // TensorBoard extras.
        boolean(
            "tensorboard.train_images",
            false,
            "TensorBoard: a grid of each epoch's first training batch (Train/Image)",
        ),
        boolean(
            "tensorboard.val_images",
            false,
            "TensorBoard: a grid of the first validation batch at epoch 0 (Val/Image)",
        ),
        boolean(
            "tensorboard.model_params",
            false,
            "TensorBoard: a histogram of every parameter after each validation",
        ),
        // Learning-rate schedule.
        int("scheduler.epochs", 160, "Number of training epochs").with_range(IntRange::at_least(1)),
        string("scheduler.warmup.type", "none", "Learning-rate warm-up").with_choices([
            "none",
            "linear",
            "exponential",
        ]),
        int(
            "scheduler.warmup.epochs",
            0,
            "Warm-up epochs (counted within scheduler.epochs)",
        )
        .with_range(IntRange::at_least(0)),
        float(
            "scheduler.warmup.start_factor",
            1e-3,
            "Warm-up starts at this fraction of the base lr",
        ),
        int(
            "scheduler.warmup.exponent",
            4,
            "Exponent of the exponential warm-up",
        )
        .with_range(IntRange::at_least(0)),
        string(
            "scheduler.type",
            "multistep",
            "Main learning-rate schedule (a registered scheduler name)",
        ),
        int_list(
            "scheduler.milestones",
            &[80, 120],
            "Epochs at which multistep decays the lr",
        )
        .with_range(IntRange::at_least(1)),
        float("scheduler.lr_decay", 0.1, "Multistep lr decay factor"),
        float(
            "scheduler.lr_min_factor",
            1e-3,
            "Final lr as a fraction of the base lr (linear, cosine, sgdr)",
        ),
        int("scheduler.T0", 10, "SGDR: epochs of the first cycle")
            .with_range(IntRange::at_least(1)),
        float("scheduler.T_mul", 1.0, "SGDR: cycle length multiplier"),
        // Validation.
        int("validation.batch_size", 256, "Validation batch size")
            .with_range(IntRange::at_least(1)),
        int(
            "validation.dataloader.num_workers",
            2,
            "Validation data-loading worker threads",
        )
        .with_range(IntRange::at_least(0)),
        boolean(
            "validation.dataloader.drop_last",
            false,
            "Drop the last incomplete validation batch",
        )
        .unsupported(),
        boolean(
            "validation.dataloader.pin_memory",
            false,
            "Pin host memory of validation batches",
        ),
        boolean(
            "validation.dataloader.non_blocking",
            false,
            "Copy validation batches to the device asynchronously",
        ),
        // Augmentation switches (each method's parameters live under augmentation.<name>).
        boolean(
            "augmentation.use_random_crop",
            true,
            "Random crop with padding",
        ),
        boolean(
            "augmentation.use_random_horizontal_flip",
            true,
            "Random horizontal flip",
        ),
        boolean("augmentation.use_cutout", false, "Cutout"),
        boolean("augmentation.use_random_erasing", false, "Random erasing"),
        boolean("augmentation.use_dual_cutout", false, "Dual cutout"),
        boolean("augmentation.use_mixup", false, "Mixup"),
        boolean("augmentation.use_ricap", false, "RICAP"),
        boolean("augmentation.use_cutmix", false, "CutMix"),
        boolean("augmentation.use_label_smoothing", false, "Label smoothing"),
        // Test-time augmentation.
        // Image folders (ImageNet): the validation/test transform; fixed-size datasets ignore
        // them, as the reference's CIFAR transform does.
        boolean(
            "tta.use_resize",
            false,
            "Image folders, validation: resize the shorter side to tta.resize first",
        ),
        boolean(
            "tta.use_center_crop",
            false,
            "Image folders, validation: center crop to dataset.image_size",
        ),
        int(
            "tta.resize",
            256,
            "Image folders, validation: shorter side after resizing",
        )
        .with_range(IntRange::at_least(1)),
        // Evaluation.
        string(
            "test.checkpoint",
            "",
            "Weights to evaluate (imgclf checkpoint, safetensors or torch.save file)",
        ),
        string("test.output_dir", "", "Directory for evaluation outputs"),
        int("test.batch_size", 256, "Evaluation batch size").with_range(IntRange::at_least(1)),
        int(
            "test.dataloader.num_workers",
            2,
            "Evaluation data-loading worker threads",
        )
        .with_range(IntRange::at_least(0)),
        boolean(
            "test.dataloader.pin_memory",
            false,
            "Pin host memory of evaluation batches",
        ),
    ];
    let mut schema = Schema::new();
    for spec in specs {
        let key = spec.key.clone();
        if let Err(err) = schema.add(spec) {
            // The list above is fixed at compile time; the unit tests exercise it.
            panic!("host schema key {key}: {err}");
        }
    }
    schema
}
