"""End-to-end: a real Flower simulation (Ray backend) of the app, read back with pandas.

Distributed MAML made provable: with `fusion = "meta-gradient"`, one local meta-batch per round
and the server's Adam, N clients produce the same meta-parameters as central MAML over the union
of their tasks. A run resumed from a checkpoint ends where the uninterrupted run ends.
"""

import pandas as pd
import pytest
import torch
from flwr.simulation import run_simulation

from clients.client_app import app as client_app
from fedmeta import algorithms, local, partition, seeding
from fedmeta.config import Config
from fedmeta.results import latest_checkpoint, load_checkpoint, load_meta_model, load_run
from fedmeta.tasks import Episode
from strategies.server_app import server_app

NODES, HELDOUT, ROUNDS = 4, 1, 3


def simulate(cfg: Config) -> None:
    run_simulation(server_app=server_app(cfg), client_app=client_app, num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    cfg = Config(fusion="meta-gradient", num_rounds=ROUNDS, local_iterations=1, meta_batch_size=5,
                 heldout_partitions=HELDOUT, eval_tasks=10, eval_steps=3, server_lr=0.01,
                 results_dir=str(base), run_name="full", server_eval_tasks=20)
    simulate(cfg)
    ckpt = base / "full" / "checkpoints" / "round-0002.pt"
    simulate(cfg.replace(run_name="resumed", resume=str(ckpt)))
    return cfg, base


def central_union(cfg: Config) -> dict:
    """Central MAML (the core alone) on the union of the training clients' meta-batches."""
    algo = algorithms.build(cfg)
    params = algo.init(seeding.generator(cfg.seed, "init"))
    train = [p for p in range(NODES) if not partition.is_heldout(cfg, p, NODES)]
    sources = {p: partition.task_source(cfg, p, NODES) for p in train}

    def union(i: int) -> Episode:  # round i + 1
        return Episode.cat([local.train_episodes(cfg, sources[p], p, i + 1, 1)[0] for p in train])

    central = algo.cfg.replace(meta_lr=cfg.server_lr)
    algo.cfg = central
    params, _, _ = algo.train(params, None, union, cfg.num_rounds)
    return params


def test_meta_gradient_fusion_equals_central_maml_on_the_union(runs):
    cfg, base = runs
    fed = load_meta_model(base / "full" / "model.pt").params
    central = central_union(cfg)
    diff = max(float((fed[k] - central[k]).abs().max()) for k in central)
    assert diff <= 1e-5
    init = algorithms.build(cfg).init(seeding.generator(cfg.seed, "init"))
    assert max(float((fed[k] - init[k]).abs().max()) for k in init) > 1e-3  # it did move


def test_rounds_and_clients_tables(runs):
    cfg, base = runs
    run = load_run(base / "full")
    assert run.status["status"] == "completed"
    r, c = run.rounds, run.clients
    assert list(r["round"]) == [1, 2, 3]
    assert (r["num_sampled"] == NODES - HELDOUT).all() and (r["num_replies"] == NODES - HELDOUT).all()
    assert (r["num_rejected"] == 0).all() and (r["num_failures"] == 0).all()
    for col in ("train_loss", "eval_loss_pre", "eval_loss_post", "server_loss_pre", "server_loss_post", "seconds"):
        assert r[col].notna().all() and (r[col] > 0).all(), col
    assert r["eval_accuracy_post"].isna().all()  # regression: no accuracy
    assert pd.api.types.is_integer_dtype(r["round"]) and pd.api.types.is_float_dtype(r["train_loss"])
    train, ev = c[c["phase"] == "train"], c[c["phase"] == "evaluate"]
    assert len(train) == ROUNDS * (NODES - HELDOUT) and len(ev) == ROUNDS * HELDOUT
    assert set(train["partition_id"]) == {0, 1, 2} and set(ev["partition_id"]) == {3}
    assert (c["status"] == "ok").all()
    assert (train["weight"] == 5).all() and (ev["num_tasks"] == 10).all()
    # the round's eval loss is the task-weighted mean of the held-out clients' losses
    for rnd, group in ev.groupby("round"):
        expected = (group["loss_post"] * group["num_tasks"]).sum() / group["num_tasks"].sum()
        assert r.loc[r["round"] == rnd, "eval_loss_post"].item() == pytest.approx(expected)
    assert run.config["config"]["fusion"] == "meta-gradient" and "torch" in run.config["versions"]


def test_checkpoints_and_resume(runs):
    cfg, base = runs
    ckpts = sorted((base / "full" / "checkpoints").glob("round-*.pt"))
    assert [p.name for p in ckpts] == ["round-0001.pt", "round-0002.pt", "round-0003.pt"]
    ckpt = load_checkpoint(latest_checkpoint(base / "full")[0])
    assert ckpt["round"] == 3 and ckpt["fusion"]["optimizer_state"]["step"] == 3
    full = load_meta_model(base / "full" / "model.pt")
    resumed = load_meta_model(base / "resumed" / "model.pt")
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    assert list(load_run(base / "resumed").rounds["round"]) == [3]
    # the shipped loader gives a working nn.Module
    assert isinstance(full.module(torch.zeros(4, 1)), torch.Tensor)


def test_average_fusion_clients_keep_their_adam_across_rounds(tmp_path):
    """fusion = "average": each client continues its own Adam (moments kept by the server per partition) from
    round to round; the global model is the weighted average of the clients' models. Reproduced
    here with the core alone, and distinguishable from a fresh Adam every round."""
    from strategies.fusion import weighted_average

    cfg = Config(num_rounds=2, local_iterations=2, meta_batch_size=5, heldout_partitions=HELDOUT, eval_tasks=5,
                 eval_steps=1, results_dir=str(tmp_path), run_name="avg")
    simulate(cfg)
    fed = load_meta_model(tmp_path / "avg" / "model.pt").params

    def expected(keep: bool) -> dict:
        algo = algorithms.build(cfg)
        params = algo.init(seeding.generator(cfg.seed, "init"))
        train = [p for p in range(NODES) if not partition.is_heldout(cfg, p, NODES)]
        states = dict.fromkeys(train)
        for rnd in (1, 2):
            models = []
            for p in train:
                c = local.client(cfg, p, NODES)
                out = local.train(c, params, rnd, states[p] if keep else None)
                states[p] = out.optimizer_state
                models.append((out.arrays, out.num_tasks))
            params = weighted_average(models)
        return params

    def gap(ref: dict) -> float:
        return max(float((fed[k] - ref[k]).abs().max()) for k in ref)

    assert gap(expected(keep=True)) <= 1e-6
    assert gap(expected(keep=False)) > 1e-5  # a fresh Adam each round gives another model
