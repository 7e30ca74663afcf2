//! Class names of the built-in datasets, as torchvision lists them (CIFAR's from the archives'
//! `batches.meta` / `meta` files), for `imgclf predict` and the confusion matrix.

const CIFAR10: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The fine labels of CIFAR-100, in label order (alphabetical).
const CIFAR100: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

const MNIST: [&str; 10] = [
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
];

const FASHION_MNIST: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Kuzushiji-MNIST's romanised hiragana, as torchvision names them.
const KMNIST: [&str; 10] = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"];

/// The class names of a dataset of the registry, in label order; `None` when unknown.
pub fn class_names(dataset: &str) -> Option<&'static [&'static str]> {
    Some(match dataset {
        "CIFAR10" => &CIFAR10,
        "CIFAR100" => &CIFAR100,
        "MNIST" => &MNIST,
        "FashionMNIST" => &FASHION_MNIST,
        "KMNIST" => &KMNIST,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_class_counts() {
        for name in ["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST"] {
            let d = crate::datasets::find(name).unwrap();
            let names = class_names(d.name).unwrap();
            assert_eq!(names.len(), d.n_classes, "{}", d.name);
        }
        let c100 = class_names("CIFAR100").unwrap();
        assert!(c100.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert_eq!(c100[0], "apple");
        assert_eq!(c100[99], "worm");
        assert_eq!(class_names("FashionMNIST").unwrap()[9], "Ankle boot");
        assert!(class_names("ImageNet").is_none());
    }
}
