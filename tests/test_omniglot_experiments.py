"""Smoke tests of the Omniglot experiment scripts' functions (experiments/omniglot_*.py) on
synthetic Omniglot-shaped task sources: tiny budgets, no data files, no Flower."""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.tasks.omniglot import OmniglotTasks

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def exp():
    """The three scripts as modules (they import their siblings as top-level modules)."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield {name: importlib.import_module(name) for name in ("omniglot_central", "omniglot_federated",
                                                                "omniglot_lstm")}
    finally:
        sys.path.remove(str(EXPERIMENTS))


def synthetic(classes: int, ways: int, seed: int = 0) -> OmniglotTasks:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(classes, 20, 28, 28, generator=g) > 0.8).to(torch.uint8) * 255
    return OmniglotTasks(images, torch.arange(1, classes + 1), torch.zeros(classes, dtype=torch.int64), ways)


def cfg(**kw) -> Config:
    base = dict(task="omniglot", ways=3, shots=1, query_shots=1, inner_lr=0.4, meta_batch_size=2, eval_shots=1,
                eval_query_shots=1, eval_steps=1)
    return Config(**{**base, **kw})


def test_train_central_iterations_curve_budget_and_seed(exp):
    central, c = exp["omniglot_central"], cfg()
    src, cpu = synthetic(8, 3), torch.device("cpu")
    seen = []

    def val(p):
        seen.append(p)
        return {"n": len(seen)}

    params, curve, timing = central.train_central(c, src, iterations=3, budget_s=0, eval_every=2, validate=val,
                                                  device=cpu, log=False)
    assert [r["iteration"] for r in curve] == [0, 2, 3] and timing["iterations"] == 3
    assert timing["stopped_by"] == "iterations" and math.isnan(curve[0]["train_loss"])
    assert all(math.isfinite(r["train_loss"]) for r in curve[1:])
    again, _, _ = central.train_central(c, src, iterations=3, budget_s=0, eval_every=2, validate=lambda p: {},
                                        device=cpu, log=False)
    assert all(torch.equal(params[k], again[k]) for k in params)  # same seed, same numbers
    assert not torch.equal(params["head.weight"], seen[0]["head.weight"])  # it trained
    # a budget already spent: no iteration, a curve of the initial model only
    _, curve, timing = central.train_central(c, src, iterations=3, budget_s=1e-9, eval_every=2,
                                             validate=lambda p: {}, device=cpu, log=False)
    assert timing["iterations"] == 0 and timing["stopped_by"] == "budget" and len(curve) == 1


def test_reproduce_replaces_the_budget_by_the_iterations_reached(exp):
    r = exp["omniglot_central"].reproduce
    assert r(["--threads", "2", "--budget-minutes", "60"], 1234) == \
        "python experiments/omniglot_central.py --threads 2 --iterations 1234"
    assert r(["--budget-minutes=5", "--iterations", "9", "--ways", "20"], 7).endswith("--ways 20 --iterations 7")


def test_device_cuda_without_cuda_is_an_error(exp):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        exp["omniglot_central"].resolve_device("cuda")
    assert exp["omniglot_central"].resolve_device("auto").type == "cpu"


def test_rounds_to_target_and_flags(exp):
    fed = exp["omniglot_federated"]
    acc = lambda r, a: {"round": r, "eval_accuracy_post": a}  # noqa: E731
    curves = {"fedavg": [acc(0, 0.5), acc(3, 0.6), acc(6, 0.7), acc(9, 0.7)],
              "fedmeta": [acc(0, 0.5), acc(3, 0.65), acc(6, 0.72), acc(9, 0.8)],
              "dist-maml": [acc(0, 0.5), acc(3, 0.55), acc(6, 0.6), acc(9, 0.62)]}
    rows = fed.rounds_to_target(curves, {}, round0=0.5)
    by = {r["variant"]: r for r in rows}
    assert by["fedmeta"]["rounds"] == 6 and by["fedmeta"]["baseline_rounds"] == 6 and by["fedmeta"]["ratio"] == 1.0
    assert by["dist-maml"]["rounds"] is None and by["dist-maml"]["ratio"] is None
    assert not by["fedmeta"]["target_below_random_init"]
    # round 0 never counts as reaching a target, and a target under the random init is flagged
    low = {"fedavg": [acc(0, 0.5), acc(3, 0.4)], "fedmeta": [acc(0, 0.5), acc(3, 0.9)]}
    (row,) = fed.rounds_to_target(low, {}, round0=0.5)
    assert row["rounds"] == 3 and row["target_below_random_init"]


def test_fedavg_global_head_and_determinism(exp, monkeypatch):
    fed = exp["omniglot_federated"]
    c = cfg(heldout_partitions=1)
    sizes = {0: 4, 1: 5, 2: 6}  # 3 training clients with 4 + 5 + 6 global classes
    monkeypatch.setattr(fed.partition, "task_source", lambda cfg, pid, n: synthetic(sizes[pid], 3, seed=pid))
    heads = []

    def val(p):
        heads.append((tuple(p["head.weight"].shape), float(p["head.weight"].abs().sum())))
        return {"eval_accuracy_post": 0.0}

    params, curve, _ = fed.fedavg_global(c, 4, rounds=2, local_steps=2, fraction=1.0, eval_every=1, validate=val)
    assert params["head.weight"].shape == (15, 64)  # one output per global class
    assert heads == [((3, 64), 0.0)] * 3  # evaluated with a fresh zero 3-way head, rounds 0, 1, 2
    assert [r["round"] for r in curve] == [0, 1, 2] and math.isfinite(curve[-1]["train_loss"])
    again, _, _ = fed.fedavg_global(c, 4, rounds=2, local_steps=2, fraction=1.0, eval_every=1, validate=val)
    assert all(torch.equal(params[k], again[k]) for k in params)


def test_query_metrics_match_a_plain_loop(exp):
    lstm_exp = exp["omniglot_lstm"]
    from lstm_quadratic import baseline

    c = cfg(algorithm="lstm", shots=2, query_shots=2, ways=3)
    algo = algorithms.build(c)
    ep = synthetic(6, 3).sample(3, 2, 2, seeding.generator(0, "test"))
    start = algo.start_params({}, 3, seeding.generator(0, "eval"))
    loss, acc = lstm_exp.query_metrics(algo, baseline("sgd", 0.5), ep, start, 4, chunk=2)
    for t in range(3):
        p = {k: v[t].clone().requires_grad_() for k, v in start.items()}
        for _ in range(4):
            g = torch.autograd.grad(algo.task_loss(p, ep.support_x[t], ep.support_y[t]), list(p.values()))
            p = {k: (v - 0.5 * gk).detach().requires_grad_() for (k, v), gk in zip(p.items(), g)}
        out = algo.forward(p, ep.query_x[t])
        torch.testing.assert_close(loss[t], algo.loss(out, ep.query_y[t]).detach())
        assert acc[t] == (out.argmax(-1) == ep.query_y[t]).float().mean()
