"""Many virtual clients: the server binds partitions to nodes instead of asking every node who it is
(assign-partitions), with the same sampled partitions and the same numbers as asking (real Flower
simulations at 10 and 100 virtual clients), with or without the index over Flower's LinkState."""

import pandas as pd
import pytest
from flwr.simulation import run_simulation

from clients.client_app import app as client_app
from fedmeta.config import Config
from fedmeta.results import load_run
from strategies.server_app import server_app


def simulate(cfg: Config, nodes: int) -> None:
    run_simulation(server_app=server_app(cfg), client_app=client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})


@pytest.mark.parametrize("nodes", [pytest.param(10, marks=pytest.mark.slow), 100])  # 100: the default run
def test_assigned_partitions_give_the_numbers_of_discovery(nodes, tmp_path):
    cfg = Config(num_rounds=2, local_iterations=1, meta_batch_size=2, eval_tasks=4, eval_steps=1,
                 fraction_train=0.3, results_dir=str(tmp_path), seed=3)
    simulate(cfg.replace(run_name="assigned"), nodes)
    # and with Flower's own message pump (linkstate-index off): the index changes no number either
    simulate(cfg.replace(run_name="discovered", assign_partitions=False, linkstate_index=False), nodes)
    a, d = load_run(tmp_path / "assigned"), load_run(tmp_path / "discovered")
    assert a.status["status"] == d.status["status"] == "completed"
    numbers = [c for c in a.rounds.columns if c != "seconds"]
    pd.testing.assert_frame_equal(a.rounds[numbers], d.rounds[numbers])
    expected = max(1, -(-3 * (nodes - 2) // 10))  # ceil(0.3 x training partitions)
    assert (a.rounds["num_sampled"] == expected).all() and (a.rounds["num_replies"] == expected).all()

    def partitions(run):  # which partitions trained and evaluated, with what results
        cols = ["round", "partition_id", "phase", "status", "weight", "loss", "loss_pre", "loss_post"]
        return run.clients[cols].sort_values(["round", "phase", "partition_id"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(partitions(a), partitions(d))
    ev = a.clients[a.clients["phase"] == "evaluate"]
    assert set(ev["partition_id"]) == {nodes - 2, nodes - 1}  # held-out partitions evaluate, never train
    assert not set(a.clients.loc[a.clients["phase"] == "train", "partition_id"]) & {nodes - 2, nodes - 1}
