"""Many meta-iterations do not grow memory: no retained graphs, no accumulating tensors, flat RSS.

A leak of one autograd graph per iteration (activations of 25 tasks) would be ~1 MB per iteration
here, so hundreds of iterations separate a leak from allocator noise by far.
"""

import gc
import os
import warnings

import pytest
import torch

from fedmeta import seeding
from fedmeta.algorithms import Algorithm, build
from fedmeta.config import Config
from fedmeta.tasks.sinusoid import SinusoidTasks

ITERATIONS = 300
RSS_SLACK_MB = 8.0


def rss_mb() -> float:
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS is read from /proc (Linux)")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some lazily deprecated module attributes warns
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def run(algo: Algorithm, params, iterations: int):
    """`iterations` meta-iterations on a fixed pool of episodes (sampling itself allocates nothing new)."""
    source = SinusoidTasks()
    pool = [source.sample(25, 10, 10, seeding.generator(0, "test", i)) for i in range(4)]
    params, state, curve = algo.train(params, None, lambda i: pool[i % len(pool)], iterations)
    return params, state, curve


def check_stable(cfg: Config, iterations: int = ITERATIONS):
    algo = build(cfg)
    params = algo.init(seeding.generator(0, "init"))
    params, _, _ = run(algo, params, 20)  # warm-up: allocator pools, compile, caches
    grads, loss = algo.meta_gradient(params, SinusoidTasks().sample(25, 10, 10, seeding.generator(0, "test")))
    assert isinstance(loss, float)
    assert all(g.grad_fn is None and not g.requires_grad for g in grads.values())
    del grads
    tensors, rss = live_tensors(), rss_mb()
    params, state, curve = run(algo, params, iterations)
    assert len(curve) == iterations and all(map(torch.isfinite, map(torch.tensor, curve)))
    assert all(p.grad_fn is None and not p.requires_grad for p in params.values())
    del params, state
    grown_tensors, grown_rss = live_tensors() - tensors, rss_mb() - rss
    assert grown_tensors <= 0, f"{grown_tensors} more live tensors after {iterations} iterations"
    assert grown_rss < RSS_SLACK_MB, f"RSS grew {grown_rss:.1f} MB over {iterations} iterations"


@pytest.mark.parametrize("steps", [1, 5])
def test_eager_fast_path_memory_is_flat(steps):
    check_stable(Config(inner_steps=steps))


@pytest.mark.parametrize("algorithm", ["metasgd", "fomaml"])
def test_generic_path_memory_is_flat(algorithm):
    check_stable(Config(algorithm=algorithm, inner_steps=2), iterations=100)  # torch.func grad + vmap


def test_compiled_path_memory_is_flat():
    check_stable(Config(inner_steps=2, compile=True))  # same config as test_speed_paths: compile cached
