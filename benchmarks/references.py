"""What the speed benchmarks measure fedmeta against, and their shared timing tools.

- `loop_path`: the textbook second-order MAML meta-gradient, a Python loop over tasks with autograd
  (create_graph=True keeps the Hessian terms);
- `higher_path`: `higher` 0.2.1's MAML recipe (innerloop_ctx per task, the query loss backpropagated
  per task); `pip install ".[bench]"`;
- `stock_client` / `stock_server`: a stock Flower app (FedAvg from `flwr.serverapp.strategy` and a ClientApp
  that echoes its weights), the reference of the simulation-cost benchmark.
Both take the task loss (`F.mse_loss` for regression, `F.cross_entropy` for classification).
Machine info, CSV and JSON writing are `fedmeta.lab.tables`'s, as in every script.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.func import functional_call

from fedmeta.algorithms.maml import MAML
from fedmeta.tasks import Episode

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loop_path(algo: MAML, loss_fn: Loss):
    steps, lr = algo.cfg.inner_steps, algo.cfg.inner_lr

    def run(meta_params, episode: Episode):
        init = {k: v.detach().requires_grad_() for k, v in meta_params.items()}
        total = 0.0
        for xs, ys, xq, yq in zip(*episode):  # one task: (shots, ...) each
            params = init
            for _ in range(steps):
                loss = loss_fn(functional_call(algo.model, params, (xs,)), ys)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
            total = total + loss_fn(functional_call(algo.model, params, (xq,)), yq)
        loss = total / episode.num_tasks
        return dict(zip(init, torch.autograd.grad(loss, list(init.values())))), float(loss.detach())

    return run


def higher_path(algo: MAML, loss_fn: Loss):
    import higher

    steps, lr = algo.cfg.inner_steps, algo.cfg.inner_lr
    model = copy.deepcopy(algo.model)
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)

    def run(meta_params, episode: Episode):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(meta_params[k])
                p.grad = None
        total = 0.0
        for xs, ys, xq, yq in zip(*episode):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(xs), ys))
                query = loss_fn(fmodel(xq), yq) / episode.num_tasks
                query.backward()
                total += float(query)
        return {k: p.grad.clone() for k, p in model.named_parameters()}, total

    return run


def time_paths(paths: dict, meta_params, episode: Episode, reps: int, warmup: int = 0) -> dict:
    """Seconds per call of every path, interleaved (rotating order) so that load hits all alike."""
    for run in paths.values():
        for _ in range(warmup):
            run(meta_params, episode)
    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            paths[n](meta_params, episode)
            times[n].append(time.perf_counter() - start)
    return times


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


# --- the stock Flower app --------------------------------------------------------------------------------------
stock_client = ClientApp()


@stock_client.train()
def echo(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0})
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)


@stock_client.evaluate()
def echo_evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "eval-loss": 0.0})}), reply_to=msg)


def stock_server(params: dict, n: int, sampled: int, evaluated: int, rounds: int, ends: Callable[[], None]
                 ) -> ServerApp:
    """FedAvg over n nodes: `sampled` train and `evaluated` evaluate every round; `ends()` is called before
    round 1 and after every round's evaluation (the benchmark's round clock)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        def stamp(server_round, arrays):  # called before round 1 and after every round's evaluation
            ends()

        FedAvg(fraction_train=sampled / n, fraction_evaluate=evaluated / n, min_train_nodes=sampled,
               min_evaluate_nodes=evaluated, min_available_nodes=n).start(
            grid, ArrayRecord(params), num_rounds=rounds, evaluate_fn=stamp)

    return app
