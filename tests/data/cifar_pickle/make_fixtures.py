"""Regenerates the tiny CIFAR python-batch fixtures read by host/src/datasets tests.

Pixel and label values follow the formulas in host/src/datasets/testutil.rs:
pixel(i, j) = (i*31 + j*7 + 3) % 256, label(i) = (i*3 + 1) % n_classes.
Run with any Python 3 that has numpy: python make_fixtures.py
"""
import pickle

import numpy as np


def batch(n, cifar100, bytes_keys):
    i = np.arange(n).reshape(n, 1)
    j = np.arange(3072).reshape(1, 3072)
    data = ((i * 31 + j * 7 + 3) % 256).astype(np.uint8)
    n_classes = 100 if cifar100 else 10
    labels = [int((k * 3 + 1) % n_classes) for k in range(n)]
    d = {"batch_label": "testing batch 1 of 1", "filenames": ["img_%d.png" % k for k in range(n)]}
    if cifar100:
        d["fine_labels"] = labels
        d["coarse_labels"] = [k % 20 for k in range(n)]
    else:
        d["labels"] = labels
    d["data"] = data
    if bytes_keys:
        d = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in d.items()}
    return d


for name, cifar100 in (("cifar10", False), ("cifar100", True)):
    for proto in (2, 3, 4, 5):
        for keys in ("str", "bytes"):
            n = 16 if (proto == 2 and keys == "str") else 2
            with open("%s_p%d_%s.pkl" % (name, proto, keys), "wb") as f:
                pickle.dump(batch(n, cifar100, keys == "bytes"), f, protocol=proto)
