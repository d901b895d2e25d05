import itertools
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
    for (_, hi1), (lo2, _) in itertools.pairwise(ranges):
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


def test_partitions_are_those_of_before():
    """Bins, slices and tasks recorded with the partitioning before it moved into the task families."""
    for seed, n, heldout, want in ((0, 10, 2, [7, 5, 9, 2, 8, 1, 4, 0, 3, 6]), (7, 10, 2, [1, 0, 4, 7, 6, 2, 3, 9, 8, 5]),
                                   (0, 5, 3, [0, 4, 3, 2, 1]), (7, 4, 1, [0, 2, 3, 1])):
        assert [partition.bin_of(Config(seed=seed, heldout_partitions=heldout), p, n) for p in range(n)] == want
    cfg = Config(amplitude_min=0.5)
    assert partition.task_source(cfg, 9, 10).amplitude == pytest.approx((3.2, 3.65))  # bin 6 of 0.5..5
    ep = partition.task_source(cfg, 3, 10).sample(3, 4, 5, seeding.generator(0, "train", 3, 1))
    assert ep.support_y[0, :3].flatten().tolist() == [-1.533057689666748, 1.5210682153701782, 1.4515467882156372]
    quad = Config(task="quadratic", algorithm="lstm", seed=1, heldout_partitions=3, quadratic_scale_min=0.5,
                  quadratic_scale_max=2.0)
    assert partition.task_source(quad, 0, 5).scale == pytest.approx((1.7, 2.0))


def test_one_table_maps_tasks_to_models_and_losses():
    from fedmeta import algorithms, models
    from fedmeta.config import ConfigError
    from fedmeta.tasks import families

    for task, algorithm, model, loss in (("sinusoid", "maml", "MLP", "mse"), ("sinusoid", "lstm", "MLP", "mse"),
                                         ("quadratic", "lstm", "Linear", "sse"),
                                         ("omniglot", "maml", "Conv4", "cross_entropy"),
                                         ("omniglot", "lstm", "Optimizee", "cross_entropy")):
        cfg = Config(task=task, algorithm=algorithm)
        algo = algorithms.build(cfg)
        assert type(algo.model).__name__ == model and algo.loss.__name__ == loss == families.loss_name(cfg)
        assert type(models.build(models.model_name(cfg), cfg)) is type(algo.model)  # saved meta-models too
        assert algo.classification == families.family(task).classification
    with pytest.raises(ConfigError, match="task = 'sinusoid' is not a classification task"):
        Config(algorithm="pretrain-global")  # rejected at start-up, before any model is looked up


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
