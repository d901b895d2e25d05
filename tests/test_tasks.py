import math

import pytest
import torch

from fedmeta import partition, seeding
from fedmeta.config import Config
from fedmeta.tasks import Episode, check_episode
from fedmeta.tasks.quadratic import QuadraticTasks
from fedmeta.tasks.sinusoid import SinusoidTasks


def test_sinusoid_shapes_ranges_and_function():
    ep = SinusoidTasks().sample(7, 10, 15, seeding.generator(0, "test"))
    assert [tuple(t.shape) for t in ep] == [(7, 10, 1), (7, 10, 1), (7, 15, 1), (7, 15, 1)]
    x = torch.cat([ep.support_x, ep.query_x], 1)
    y = torch.cat([ep.support_y, ep.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5.0
    # every task is one sinusoid A sin(x - phase): fit A, phase from two points and check the rest
    for t in range(7):
        a_cos, a_sin = torch.linalg.lstsq(torch.cat([torch.sin(x[t]), -torch.cos(x[t])], 1), y[t]).solution
        amp, phase = math.hypot(a_cos, a_sin), math.atan2(a_sin, a_cos)
        assert 0.1 <= amp <= 5.0 and -1e-4 <= phase <= math.pi + 1e-4
        assert torch.allclose(amp * torch.sin(x[t] - phase), y[t], atol=1e-4)


def test_sampling_is_seeded():
    a = SinusoidTasks().sample(3, 5, 5, seeding.generator(1, "test"))
    b = SinusoidTasks().sample(3, 5, 5, seeding.generator(1, "test"))
    c = SinusoidTasks().sample(3, 5, 5, seeding.generator(2, "test"))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a.support_x, c.support_x)


def test_quadratic_episode_is_the_problem():
    ep = QuadraticTasks(dim=10).sample(4, generator=seeding.generator(0, "test"))
    w, y = ep.support_x, ep.support_y  # (4, 10, 10), (4, 10, 1)
    assert w.shape == (4, 10, 10) and y.shape == (4, 10, 1)
    theta = torch.randn(10, 1)
    f = ((w[0] @ theta - y[0]) ** 2).sum()
    assert torch.allclose(f, torch.linalg.vector_norm(w[0] @ theta - y[0]) ** 2)


def test_non_iid_partitions_cover_the_range_disjointly():
    cfg = Config(amplitude_min=0.1, amplitude_max=5.0)
    ranges = sorted(partition.task_source(cfg, p, 10).amplitude for p in range(10))
    assert ranges[0][0] == pytest.approx(0.1) and ranges[-1][1] == pytest.approx(5.0)
    for (lo1, hi1), (lo2, hi2) in zip(ranges, ranges[1:]):
        assert hi1 == pytest.approx(lo2)
    assert partition.is_heldout(cfg, 9, 10) and partition.is_heldout(cfg, 8, 10)
    assert not partition.is_heldout(cfg, 7, 10)
    with pytest.raises(ValueError, match="partition-id"):
        partition.task_source(cfg, 10, 10)


@pytest.mark.parametrize("seed", range(20))
def test_heldout_partitions_own_interior_slices(seed):
    """Training partitions cover both edges of the range: held-out clients interpolate, never extrapolate."""
    for n, heldout in ((10, 2), (5, 3), (4, 1)):
        cfg = Config(seed=seed, heldout_partitions=heldout)
        bins = [partition.bin_of(cfg, p, n) for p in range(n)]
        assert sorted(bins) == list(range(n))
        assert {0, n - 1} <= set(bins[:n - heldout])
    other = [partition.bin_of(Config(seed=seed + 1), p, 10) for p in range(10)]
    assert other != [partition.bin_of(Config(seed=seed), p, 10) for p in range(10)]  # the seed matters


@pytest.mark.parametrize("bad", [
    Episode(torch.zeros(2, 5, 1), torch.zeros(3, 5, 1), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)),
    Episode(torch.zeros(2, 5, 1), torch.zeros(2, 4, 1), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)),
    Episode(torch.zeros(2, 5, 1), torch.zeros(2, 5, 1), torch.zeros(2, 5, 2), torch.zeros(2, 5, 1)),
    Episode(torch.full((2, 5, 1), math.nan), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)),
    Episode(torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.zeros(5)),
])
def test_bad_episodes_are_rejected(bad):
    with pytest.raises(ValueError, match="episode"):
        check_episode(bad)
