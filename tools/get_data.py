"""Get Fashion-MNIST into data/ (from Debian's dataset-fashion-mnist if installed, else by
download) and check that it loads. MNIST too when called with --mnist (needs a network)."""

from __future__ import annotations

import sys

from fed_helpers import default_data_dir, load_dataset

names = ["fashion_mnist"] + (["mnist"] if "--mnist" in sys.argv else [])
for name in names:
    for train in (True, False):
        x, y = load_dataset(name, train=train)
        print(f"{name} {'train' if train else 'test'}: {len(x):,} images in {default_data_dir()}")
