"""What a client does in a round without Flower (fedmeta/local.py), beyond test_federation's runs."""

import torch

from fedmeta import local, seeding
from fedmeta.config import Config


def test_lr_factor_scales_the_local_adam_steps():
    """Adam's first step is lr * g / (|g| + eps), about lr per coordinate: a factor of 2 doubles it."""
    cfg = Config(local_iterations=1, meta_batch_size=3, meta_lr=1e-3)
    c = local.client(cfg, 0, 3)
    meta = c.algo.init(seeding.generator(0, "init"))
    one, two = (local.train(c, meta, 1, lr_factor=f) for f in (1.0, 2.0))
    for k in meta:
        torch.testing.assert_close(two.arrays[k] - meta[k], 2 * (one.arrays[k] - meta[k]), rtol=1e-3, atol=1e-6)
    same = c.algo.train(meta, None, lambda i: local.train_episodes(cfg, c.source, 0, 1, 1)[i], 1)[0]
    assert all(torch.equal(one.arrays[k], same[k]) for k in meta)  # factor 1: meta-lr itself
