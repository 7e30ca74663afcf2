//! torchvision's ImageNet state dicts under the reference's names, so that pretrained weights
//! (`resnet18`, `resnet34`, `resnext50_32x4d`, `densenet121`, `vgg16`, `vgg16_bn`) load into the
//! `model.type imagenet` networks wherever weights are read (`train.checkpoint`,
//! `test.checkpoint`, `imgclf predict`). The mapping is told by the keys alone:
//!
//! | torchvision | reference |
//! |---|---|
//! | `conv1`, `bn1` (ResNet stem) | `conv`, `bn` |
//! | `layer{i}.{j}.conv1` ... `bn3` | `stage{i}.block{j+1}.conv1` ... `bn3` |
//! | `layer{i}.{j}.downsample.0` / `.1` | `stage{i}.block{j+1}.shortcut.conv` / `.bn` |
//! | `features.conv0`, `features.norm0` (DenseNet stem) | `conv`, `bn` |
//! | `features.denseblock{i}.denselayer{j}.norm1` ... `conv2` (old files: `norm.1`) | `stage{i}.block{j}.bn1` ... `conv2` |
//! | `features.transition{i}.norm` / `.conv` | `stage{i}.transition.bn` / `.conv` |
//! | `features.norm5` | `bn_last` |
//! | `features.{k}` (VGG: conv, BN; a max-pool between stages) | `stage{s}.conv{l}` / `stage{s}.bn{l}` |
//! | `classifier.0` / `.3` / `.6` (VGG) | `fc1` / `fc2` / `fc3` |
//! | `fc`, `classifier` (DenseNet) | `fc` |

use imgclf_plugin_api::NamedTensor;
use std::collections::{BTreeMap, HashMap};
use tch::Tensor;

/// Which torchvision family a state dict comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `torchvision.models.ResNet` (resnet*, resnext*, wide_resnet*).
    ResNet,
    DenseNet,
    Vgg,
}

impl Family {
    /// The family whose key layout `keys` has, if any.
    pub fn of<'a>(mut keys: impl Iterator<Item = &'a str> + Clone) -> Option<Family> {
        if keys.clone().any(|k| k.starts_with("layer1.0."))
            && keys.clone().any(|k| k == "fc.weight")
        {
            Some(Family::ResNet)
        } else if keys.clone().any(|k| k.starts_with("features.denseblock1.")) {
            Some(Family::DenseNet)
        } else if keys.clone().any(|k| k == "features.0.weight")
            && keys.any(|k| k == "classifier.0.weight")
        {
            Some(Family::Vgg)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::ResNet => "ResNet/ResNeXt",
            Family::DenseNet => "DenseNet",
            Family::Vgg => "VGG",
        }
    }
}

/// `weights` under the reference's names when they are a torchvision state dict that does not
/// fit the model as it is (a state dict of imgclf or the reference, which has every name of the
/// model, loads unchanged; both name the ResNet classifier `fc`); None otherwise.
pub fn to_reference_names(
    model: &[NamedTensor],
    weights: &HashMap<String, Tensor>,
) -> Option<(Family, HashMap<String, Tensor>)> {
    let fits = model
        .iter()
        .all(|t| t.name.ends_with("num_batches_tracked") || weights.contains_key(&t.name));
    if fits {
        return None;
    }
    let keys: Vec<(&str, usize)> = weights.iter().map(|(k, t)| (k.as_str(), t.dim())).collect();
    let (family, names) = reference_names(&keys)?;
    let renamed = weights
        .iter()
        .map(|(k, t)| (names[k].clone(), t.shallow_clone()))
        .collect();
    Some((family, renamed))
}

/// The reference's name of every key of a torchvision state dict (`(key, dimensions)`; VGG's
/// layout is told by which `features.{k}.weight` are 4-d), or None when the keys are not of a
/// known torchvision family. Unknown keys keep their names (and are reported as unexpected).
pub fn reference_names(keys: &[(&str, usize)]) -> Option<(Family, HashMap<String, String>)> {
    let family = Family::of(keys.iter().map(|(k, _)| *k))?;
    let names = match family {
        Family::ResNet => keys
            .iter()
            .map(|(k, _)| (k.to_string(), resnet_name(k)))
            .collect(),
        Family::DenseNet => keys
            .iter()
            .map(|(k, _)| (k.to_string(), densenet_name(k)))
            .collect(),
        Family::Vgg => vgg_names(keys),
    };
    Some((family, names))
}

/// `layer2.0.downsample.1.weight` -> `stage2.block1.shortcut.bn.weight`.
fn resnet_name(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["conv1", rest @ ..] => join("conv", rest),
        ["bn1", rest @ ..] => join("bn", rest),
        [layer, block, rest @ ..] if layer.starts_with("layer") => {
            let (Some(stage), Ok(j)) = (layer.strip_prefix("layer"), block.parse::<usize>()) else {
                return key.to_string();
            };
            let inner = match rest {
                ["downsample", "0", tail @ ..] => join("shortcut.conv", tail),
                ["downsample", "1", tail @ ..] => join("shortcut.bn", tail),
                _ => rest.join("."),
            };
            format!("stage{stage}.block{}.{inner}", j + 1)
        }
        _ => key.to_string(),
    }
}

/// `features.denseblock1.denselayer2.norm1.weight` -> `stage1.block2.bn1.weight` (also the old
/// `norm.1` spelling of torchvision's published files).
fn densenet_name(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    fn layer(name: &str) -> &str {
        match name {
            "norm1" => "bn1",
            "norm2" => "bn2",
            "norm" => "bn",
            other => other,
        }
    }
    match parts.as_slice() {
        ["features", "conv0", rest @ ..] => join("conv", rest),
        ["features", "norm0", rest @ ..] => join("bn", rest),
        ["features", "norm5", rest @ ..] => join("bn_last", rest),
        ["classifier", rest @ ..] => join("fc", rest),
        ["features", block, dense, rest @ ..] if block.starts_with("denseblock") => {
            let stage = &block["denseblock".len()..];
            let j = dense.strip_prefix("denselayer").unwrap_or(dense);
            let (name, tail) = match rest {
                // Old files: `norm.1.weight` for `norm1.weight`.
                [n @ ("norm" | "conv"), i @ ("1" | "2"), tail @ ..] => (format!("{n}{i}"), tail),
                [n, tail @ ..] => (n.to_string(), tail),
                [] => return key.to_string(),
            };
            join(&format!("stage{stage}.block{j}.{}", layer(&name)), tail)
        }
        ["features", t, rest @ ..] if t.starts_with("transition") => {
            let stage = &t["transition".len()..];
            match rest {
                [n, tail @ ..] => join(&format!("stage{stage}.transition.{}", layer(n)), tail),
                [] => key.to_string(),
            }
        }
        _ => key.to_string(),
    }
}

/// VGG's `features.{k}`: convolutions (4-d weights) and BNs in order; ReLUs take one index
/// each, so a gap of one more index than that is a max-pool, which closes a stage.
fn vgg_names(keys: &[(&str, usize)]) -> HashMap<String, String> {
    let mut modules: BTreeMap<usize, bool> = BTreeMap::new(); // index -> is a conv
    for (k, dim) in keys {
        if let ["features", i, "weight"] = k.split('.').collect::<Vec<_>>().as_slice() {
            if let Ok(i) = i.parse::<usize>() {
                modules.insert(i, *dim == 4);
            }
        }
    }
    let mut names: HashMap<usize, String> = HashMap::new();
    let (mut stage, mut layer, mut last) = (1usize, 0usize, None::<usize>);
    for (&i, &is_conv) in &modules {
        if is_conv {
            if let Some(prev) = last {
                // conv/BN at prev, ReLU at prev + 1, next conv at prev + 2, or the pool there.
                if i > prev + 2 {
                    stage += 1;
                    layer = 0;
                } else {
                    layer += 1;
                }
            }
            names.insert(i, format!("stage{stage}.conv{layer}"));
        } else {
            names.insert(i, format!("stage{stage}.bn{layer}"));
        }
        last = Some(i);
    }
    keys.iter()
        .map(|(k, _)| {
            let parts: Vec<&str> = k.split('.').collect();
            let name = match parts.as_slice() {
                ["features", i, rest @ ..] => {
                    match i.parse::<usize>().ok().and_then(|i| names.get(&i)) {
                        Some(n) => join(n, rest),
                        None => k.to_string(),
                    }
                }
                ["classifier", "0", rest @ ..] => join("fc1", rest),
                ["classifier", "3", rest @ ..] => join("fc2", rest),
                ["classifier", "6", rest @ ..] => join("fc3", rest),
                _ => k.to_string(),
            };
            (k.to_string(), name)
        })
        .collect()
}

fn join(head: &str, rest: &[&str]) -> String {
    if rest.is_empty() {
        head.to_string()
    } else {
        format!("{head}.{}", rest.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn dict(entries: &[(&str, &[i64])]) -> HashMap<String, Tensor> {
        entries
            .iter()
            .map(|(k, s)| (k.to_string(), Tensor::zeros(*s, (Kind::Float, Device::Cpu))))
            .collect()
    }

    fn names(d: &HashMap<String, Tensor>) -> Vec<String> {
        let mut v: Vec<String> = d.keys().cloned().collect();
        v.sort();
        v
    }

    /// The reference names of a VGG state dict, sorted.
    fn vgg(d: &HashMap<String, Tensor>) -> Vec<String> {
        let keys: Vec<(&str, usize)> = d.iter().map(|(k, t)| (k.as_str(), t.dim())).collect();
        let mut v: Vec<String> = vgg_names(&keys).into_values().collect();
        v.sort();
        v
    }

    #[test]
    fn resnet_and_densenet_keys_map_to_the_reference_names() {
        for (tv, reference) in [
            ("conv1.weight", "conv.weight"),
            ("bn1.running_var", "bn.running_var"),
            ("layer1.0.conv1.weight", "stage1.block1.conv1.weight"),
            (
                "layer4.1.bn2.num_batches_tracked",
                "stage4.block2.bn2.num_batches_tracked",
            ),
            (
                "layer2.0.downsample.0.weight",
                "stage2.block1.shortcut.conv.weight",
            ),
            (
                "layer3.0.downsample.1.bias",
                "stage3.block1.shortcut.bn.bias",
            ),
            ("fc.bias", "fc.bias"),
        ] {
            assert_eq!(resnet_name(tv), reference);
        }
        for (tv, reference) in [
            ("features.conv0.weight", "conv.weight"),
            ("features.norm0.bias", "bn.bias"),
            (
                "features.denseblock2.denselayer12.norm2.running_mean",
                "stage2.block12.bn2.running_mean",
            ),
            (
                "features.denseblock1.denselayer1.norm.1.weight",
                "stage1.block1.bn1.weight",
            ),
            (
                "features.denseblock4.denselayer3.conv.2.weight",
                "stage4.block3.conv2.weight",
            ),
            (
                "features.transition3.norm.weight",
                "stage3.transition.bn.weight",
            ),
            (
                "features.transition1.conv.weight",
                "stage1.transition.conv.weight",
            ),
            ("features.norm5.weight", "bn_last.weight"),
            ("classifier.weight", "fc.weight"),
        ] {
            assert_eq!(densenet_name(tv), reference);
        }
    }

    #[test]
    fn vgg_indices_become_stages_with_and_without_bn() {
        // vgg11-like without BN: conv 0, pool 2, conv 3, pool 5, conv 6, conv 8, pool 10.
        let plain = dict(&[
            ("features.0.weight", &[4, 3, 3, 3]),
            ("features.0.bias", &[4]),
            ("features.3.weight", &[8, 4, 3, 3]),
            ("features.6.weight", &[8, 8, 3, 3]),
            ("features.8.weight", &[8, 8, 3, 3]),
            ("classifier.0.weight", &[16, 8]),
            ("classifier.3.bias", &[16]),
            ("classifier.6.weight", &[10, 16]),
        ]);
        assert_eq!(
            Family::of(plain.keys().map(String::as_str)),
            Some(Family::Vgg)
        );
        assert_eq!(
            vgg(&plain),
            [
                "fc1.weight",
                "fc2.bias",
                "fc3.weight",
                "stage1.conv0.bias",
                "stage1.conv0.weight",
                "stage2.conv0.weight",
                "stage3.conv0.weight",
                "stage3.conv1.weight"
            ]
        );
        // With BN: conv 0, bn 1, conv 3, bn 4, pool 6, conv 7, bn 8.
        let bn = dict(&[
            ("features.0.weight", &[4, 3, 3, 3]),
            ("features.1.weight", &[4]),
            ("features.1.running_mean", &[4]),
            ("features.3.weight", &[4, 4, 3, 3]),
            ("features.4.weight", &[4]),
            ("features.7.weight", &[8, 4, 3, 3]),
            ("features.8.num_batches_tracked", &[]),
            ("features.8.weight", &[8]),
            ("classifier.0.weight", &[16, 8]),
        ]);
        assert_eq!(
            vgg(&bn),
            [
                "fc1.weight",
                "stage1.bn0.running_mean",
                "stage1.bn0.weight",
                "stage1.bn1.weight",
                "stage1.conv0.weight",
                "stage1.conv1.weight",
                "stage2.bn0.num_batches_tracked",
                "stage2.bn0.weight",
                "stage2.conv0.weight"
            ]
        );
    }

    #[test]
    fn reference_state_dicts_are_left_alone() {
        // Both name the classifier `fc`: that alone does not make a file fit.
        let model: Vec<NamedTensor> = ["conv.weight", "fc.weight"]
            .iter()
            .map(|n| NamedTensor {
                name: n.to_string(),
                tensor: Tensor::zeros([1], (Kind::Float, Device::Cpu)),
                trainable: true,
            })
            .collect();
        let reference = dict(&[
            ("conv.weight", &[1]),
            ("fc.weight", &[1]),
            ("layer1.0.conv1.weight", &[1]),
        ]);
        assert!(to_reference_names(&model, &reference).is_none());
        let tv = dict(&[
            ("conv1.weight", &[1]),
            ("layer1.0.conv1.weight", &[1]),
            ("fc.weight", &[1]),
        ]);
        let (family, renamed) = to_reference_names(&model, &tv).unwrap();
        assert_eq!(family, Family::ResNet);
        assert_eq!(
            names(&renamed),
            ["conv.weight", "fc.weight", "stage1.block1.conv1.weight"]
        );
    }
}
