"""What one client does in a round, without Flower: local meta-training from the received global
meta-model (or its meta-gradient), and personalization evaluation on held-out tasks.

Every random draw is derived from (seed, partition, round), so a client's tasks are the same
whichever process or machine runs it; this is what lets the federated meta-gradient mode be
checked exactly against a central run over the union of the clients' tasks.

Devices: tasks are drawn on the CPU (the same numbers on any device), then the meta-parameters, the
kept Adam state and each episode move to the algorithm's device (`cfg.device`, `fedmeta.devices`);
what `train` and `evaluate` return is on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import algorithms, devices, drift, partition, seeding
from .algorithms import Algorithm
from .config import Config
from .optim import Params
from .tasks import Episode, TaskSource


@dataclass(frozen=True)
class Client:
    """A client's cached pieces: its algorithm (with model) and private task source."""

    cfg: Config
    partition_id: int
    num_partitions: int
    algo: Algorithm
    source: TaskSource

    @property
    def heldout(self) -> bool:
        return partition.is_heldout(self.cfg, self.partition_id, self.num_partitions)


@lru_cache(maxsize=2)
def algorithm(cfg: Config) -> Algorithm:
    """One algorithm (model, compiled meta-gradient) per process and config, shared by partitions."""
    torch.set_num_threads(cfg.threads)
    return algorithms.build(cfg)


@lru_cache(maxsize=64)
def client(cfg: Config, partition_id: int, num_partitions: int) -> Client:
    """A client's algorithm and task source, built once per process and cached across rounds
    (a simulation worker serves many partitions; a deployed node rebuilds per message)."""
    return Client(cfg, partition_id, num_partitions, algorithm(cfg),
                  partition.task_source(cfg, partition_id, num_partitions))


def train_episodes(cfg: Config, source: TaskSource, partition_id: int, server_round: int,
                   iterations: int, algo: Algorithm | None = None) -> list[Episode]:
    """The meta-batches a client trains on in a round (deterministic in seed, partition, round), on the
    CPU, drawn as the algorithm draws them (`Algorithm.draw`; default: `algorithm(cfg)`'s)."""
    g = seeding.generator(cfg.seed, "train", partition_id, server_round)
    draw = (algo if algo is not None else algorithm(cfg)).draw
    return [draw(source, g) for _ in range(iterations)]


def eval_episode(cfg: Config, source: TaskSource, partition_id: int) -> Episode:
    """A client's fixed held-out evaluation tasks (the same every round)."""
    g = seeding.generator(cfg.seed, "eval", partition_id)
    return source.sample(cfg.eval_tasks, cfg.eval_shots, cfg.eval_query, g)


@dataclass(frozen=True)
class TrainResult:
    arrays: Params  # new meta-parameters ("average") or meta-gradient ("meta-gradient")
    num_tasks: int
    loss: float
    seconds: float
    optimizer_state: dict | None = None  # the local Adam after the round ("average"), to keep
    control: Params | None = None  # drift-correction: the partition's new control variate (fedmeta.drift)


def train(c: Client, meta_params: Params, server_round: int, optimizer_state: dict | None = None,
          lr_factor: float = 1.0, correction: Params | None = None) -> TrainResult:
    """Local meta-training for one round starting from the global meta-parameters (and, if given,
    the local Adam state the client kept from its previous round), on the algorithm's device, with
    the local Adam's learning rate meta-lr x `lr_factor` (the round's client-lr-schedule factor).
    `correction` (drift-correction = 'scaffold'): c - c_i, added to every local meta-gradient; the
    result then carries the partition's new control variate."""
    t0 = time.perf_counter()
    cfg, device = c.cfg, c.algo.device
    episodes = train_episodes(cfg, c.source, c.partition_id, server_round, cfg.local_iterations, c.algo)
    meta_params = devices.to(meta_params, device)
    if cfg.fusion == "meta-gradient":
        # distributed MAML: the meta-gradient at the received parameters, averaged over batches
        grads, losses = zip(*(c.algo.meta_gradient(meta_params, ep.to(device)) for ep in episodes))
        arrays = {k: torch.stack([g[k] for g in grads]).mean(0) for k in meta_params}
        loss = sum(losses) / len(losses)
        control = None
    else:
        correct = None if correction is None else drift.Corrected(devices.to(correction, device))
        arrays, optimizer_state, curve = c.algo.train(meta_params, devices.to(optimizer_state, device),
                                                      lambda i: episodes[i].to(device), len(episodes),
                                                      lr=cfg.meta_lr * lr_factor, correct=correct)
        loss = sum(curve) / len(curve)
        control = None if correct is None else devices.cpu(correct.control())
    tasks = sum(ep.num_tasks for ep in episodes)
    return TrainResult(devices.cpu(arrays), tasks, loss, time.perf_counter() - t0, devices.cpu(optimizer_state),
                       control)


@dataclass(frozen=True)
class EvalResult:
    num_tasks: int
    loss_pre: float
    loss_post: float
    accuracy_pre: float | None
    accuracy_post: float | None
    seconds: float


def evaluate(c: Client, meta_params: Params) -> EvalResult:
    """Adapt the global meta-model to this client's held-out tasks (on the algorithm's device); loss
    before and after."""
    t0 = time.perf_counter()
    cfg = c.cfg
    ep = eval_episode(cfg, c.source, c.partition_id)
    ev = algorithms.evaluate(c.algo, meta_params, ep, cfg.eval_steps,
                             generator=seeding.generator(cfg.seed, "eval", c.partition_id, "starts"))
    acc = ev.accuracy
    return EvalResult(ep.num_tasks, ev.mean(0), ev.mean(cfg.eval_steps),
                      None if acc is None else float(acc[0].mean()),
                      None if acc is None else float(acc[-1].mean()),
                      time.perf_counter() - t0)
