"""The experiment library's training and evaluation pieces used by the Omniglot scripts
(fedmeta.lab.central, fedmeta.lab.optimizers, experiments/omniglot_*.py's own functions) on synthetic
Omniglot-shaped task sources: tiny budgets, no data files, no Flower."""

import math

import pytest
import torch

from experiments import omniglot_central, omniglot_federated
from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.lab import central
from fedmeta.lab.args import command, parse
from fedmeta.lab.optimizers import baseline, query_metrics
from fedmeta.tasks.omniglot import OmniglotTasks


def synthetic(classes: int, ways: int, seed: int = 0) -> OmniglotTasks:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(classes, 20, 28, 28, generator=g) > 0.8).to(torch.uint8) * 255
    return OmniglotTasks(images, torch.arange(1, classes + 1), torch.zeros(classes, dtype=torch.int64), ways)


def cfg(**kw) -> Config:
    base = dict(task="omniglot", ways=3, shots=1, query_shots=1, inner_lr=0.4, meta_batch_size=2, eval_shots=1,
                eval_query_shots=1, eval_steps=1)
    return Config(**{**base, **kw})


def test_train_central_iterations_curve_budget_and_seed():
    c, src = cfg(), synthetic(8, 3)
    seen = []

    def val(p):
        seen.append(p)
        return {"n": len(seen)}

    trained = central.train(c, src, iterations=3, eval_every=2, validate=val, log=False)
    assert [r["iteration"] for r in trained.curve] == [0, 2, 3] and trained.timing["iterations"] == 3
    assert trained.timing["stopped_by"] == "iterations" and math.isnan(trained.curve[0]["train_loss"])
    assert all(math.isfinite(r["train_loss"]) for r in trained.curve[1:])
    assert [r["n"] for r in trained.curve] == [1, 2, 3]
    again = central.train(c, src, iterations=3, eval_every=2, log=False)
    assert all(torch.equal(trained.params[k], again.params[k]) for k in trained.params)  # same seed, same numbers
    assert not torch.equal(trained.params["head.weight"], seen[0]["head.weight"])  # it trained
    # one iteration per call (as under a budget) draws the same tasks and takes the same steps
    stepwise = central.train(c, src, iterations=3, eval_every=1, log=False)
    assert all(torch.equal(trained.params[k], stepwise.params[k]) for k in trained.params)
    # a budget already spent: no iteration, a curve of the initial model only
    spent = central.train(c, src, iterations=3, budget_s=1e-9, eval_every=2, log=False)
    assert spent.timing["iterations"] == 0 and spent.timing["stopped_by"] == "budget" and len(spent.curve) == 1


def test_reproduce_command_replaces_the_budget_by_the_iterations_reached():
    args = parse(omniglot_central.Settings, ["--threads", "2", "--budget-minutes", "60"])
    assert command(args) == "python experiments/omniglot_central.py --budget-minutes 60.0 --threads 2"
    assert command(args, iterations=1234, budget_minutes=0.0) == \
        "python experiments/omniglot_central.py --iterations 1234 --threads 2"
    # the paper's defaults stay implicit; the 20-way ones are picked from --ways
    c = omniglot_central.config(parse(omniglot_central.Settings, ["--ways", "20"]), torch.device("cpu"))
    assert (c.inner_steps, c.inner_lr, c.meta_batch_size, c.eval_steps) == (5, 0.1, 16, 5)


def test_device_cuda_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        central.resolve_device("cuda")
    assert central.resolve_device("auto").type == "cpu"


def test_rounds_to_target_and_flags():
    acc = lambda r, a: {"round": r, "eval_accuracy_post": a}  # noqa: E731
    curves = {"fedavg": [acc(0, 0.5), acc(3, 0.6), acc(6, 0.7), acc(9, 0.7)],
              "fedmeta": [acc(0, 0.5), acc(3, 0.65), acc(6, 0.72), acc(9, 0.8)],
              "dist-maml": [acc(0, 0.5), acc(3, 0.55), acc(6, 0.6), acc(9, 0.62)]}
    rows = omniglot_federated.rounds_to_target(curves, {}, round0=0.5)
    by = {r["variant"]: r for r in rows}
    assert by["fedmeta"]["rounds"] == 6 and by["fedmeta"]["baseline_rounds"] == 6 and by["fedmeta"]["ratio"] == 1.0
    assert by["dist-maml"]["rounds"] is None and by["dist-maml"]["ratio"] is None
    assert not by["fedmeta"]["target_below_random_init"]
    # round 0 never counts as reaching a target, and a target under the random init is flagged
    low = {"fedavg": [acc(0, 0.5), acc(3, 0.4)], "fedmeta": [acc(0, 0.5), acc(3, 0.9)]}
    (row,) = omniglot_federated.rounds_to_target(low, {}, round0=0.5)
    assert row["rounds"] == 3 and row["target_below_random_init"]


def test_goal_picks_the_best_federated_variant_and_judges_it_again_on_fresh_episodes():
    final = {"fedmeta": 0.87, "fedmeta-r2-c05": 0.896, "dist-maml": 0.95, "central": 0.904}  # dist-maml: not FedMeta
    g = omniglot_federated.goal(final)
    assert g["best_federated"] == "fedmeta-r2-c05" and g["met"] and abs(g["gap_points"] - 0.8) < 1e-9
    fresh = omniglot_federated.fresh_goal(g, {"fedmeta-r2-c05": 0.87, "central": 0.906})
    assert not fresh["met"] and abs(fresh["gap_points"] - 3.6) < 1e-9  # chosen on the curve, judged on fresh tasks
    assert omniglot_federated.fresh_goal(g, {"central": 0.9}) is None


def test_variants_differ_from_the_shared_config_only_where_they_say():
    args = parse(omniglot_federated.Settings, ["--quick"])
    base = omniglot_federated.base_config(args)
    for name in omniglot_federated.FLOWER:
        v = omniglot_federated.variant_config(base, name, args)
        changed = {k for k, x in v.to_mapping().items() if base.to_mapping()[k] != x}
        assert changed <= {"algorithm", "fusion", "local-iterations", "server-lr"}, (name, changed)
    assert omniglot_federated.in_process(base, args).threads == args.threads


def test_query_metrics_match_a_plain_loop():
    c = cfg(algorithm="lstm", shots=2, query_shots=2, ways=3)
    algo = algorithms.build(c)
    ep = synthetic(6, 3).sample(3, 2, 2, seeding.generator(0, "test"))
    start = algo.start_params({}, 3, seeding.generator(0, "eval"))
    loss, acc = query_metrics(algo, baseline("sgd", 0.5), ep, start, 4, chunk=2)
    for t in range(3):
        p = {k: v[t].clone().requires_grad_() for k, v in start.items()}
        for _ in range(4):
            g = torch.autograd.grad(algo.task_loss(p, ep.support_x[t], ep.support_y[t]), list(p.values()))
            p = {k: (v - 0.5 * gk).detach().requires_grad_() for (k, v), gk in zip(p.items(), g)}
        out = algo.forward(p, ep.query_x[t])
        torch.testing.assert_close(loss[t], algo.loss(out, ep.query_y[t]).detach())
        assert acc[t] == (out.argmax(-1) == ep.query_y[t]).float().mean()


def test_central_budget_matches_the_federation_and_fused_variants_change_only_rates():
    args = parse(omniglot_federated.Settings, [])
    # 60 rounds x ceil(0.2 x 30) = 6 sampled clients x 10 local meta-iterations (of 8 tasks each)
    assert omniglot_federated.sampled_per_round(args) == 6 and omniglot_federated.matched_iterations(args) == 3600
    base = omniglot_federated.base_config(args)
    plain = omniglot_federated.variant_config(base, "fedmeta", args).to_mapping()
    split = {"num-rounds", "checkpoint-every", "local-iterations", "fraction-train"}
    for name in omniglot_federated.FUSED:
        cfg = omniglot_federated.variant_config(base, name, args)
        changed = {k for k, x in cfg.to_mapping().items() if plain[k] != x}
        assert changed and changed <= {"meta-lr", "client-lr-schedule", "server-lr-schedule", "server-optimizer",
                                       "server-lr", "server-momentum", "drift-correction", *split}, (name, changed)
        # every variant spends the same client meta-iterations: rounds x sampled clients x local iterations
        sampled = math.ceil(cfg.fraction_train * args.train_clients)
        assert cfg.num_rounds * sampled * cfg.local_iterations == 3600, name
        assert cfg.checkpoint_every == cfg.num_rounds
