"""Distributed central meta-training on `torch.distributed`, launched by torchrun: the tasks of every
meta-batch are split over processes ("ranks") and their meta-gradients combined, so that one user's
meta-training of one model runs on several processes, GPUs or machines and ends where one process
would. This is the data-centre form of distributed MAML (Finn, Abbeel & Levine 2017); the federated
form is `fusion = 'meta-gradient'`.

    torchrun --nproc-per-node 2 -m fedmeta.distributed -c "task='omniglot' meta-batch-size=32" \\
        --iterations 1000 --out results/dist-omniglot
    # two machines: the same command on each, node 0's address as the rendezvous endpoint
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29400 \\
        --rdzv-id run1 -m fedmeta.distributed -c "..." --iterations 1000 --out results/dist

Each meta-iteration, on every rank:
1. draw the SAME whole meta-batch (meta-batch-size tasks) from the seeded "train" stream of `seed`,
   as central training does (`experiments/sinusoid_central.py`): a rank's tasks do not depend on
   the number of ranks;
2. keep its contiguous share of the tasks (`shares`: 25 tasks on 2 ranks = 13 + 12);
3. compute the meta-gradient and loss of its share with the core (`Algorithm.train(..., share=,
   reduce=)`; the LSTM's optimizee starts are drawn for the whole batch, then shared): no
   meta-learning math lives here;
4. `all_reduce` the task-weighted sums [n_r g_r, n_r loss_r, n_r] (float64) and divide by the total:
   the mean over the whole meta-batch, which one process computes up to summation order;
5. take the same Adam step (every rank holds the same parameters: checked at each checkpoint).

Exactness. With one process (no torchrun, or `--nproc-per-node 1`) nothing is reduced and the
numbers are the core's, bit for bit. With P ranks the meta-gradient differs from one process's only
by the order of floating-point sums: per coordinate |g_P - g_1| <= B u S for a meta-batch of B tasks
(u = 2^-24 in float32, 2^-53 in float64; S = the largest coordinate of a task's meta-gradient, or of
theta for Reptile, whose pseudo-gradient theta - mean phi subtracts numbers of theta's size; measured:
at most 1.4 u S, Reptile 3.7 u S, for B = 8 to 32). Adam then moves a coordinate whose gradient is
far below its eps (1e-8) by about lr g / eps, so on such coordinates (e.g. a convolution's bias
before batch norm, whose true gradient is 0) summation-order noise grows by lr / eps along the
trajectory. In float64 (`--dtype float64`) the meta-parameters after 6 iterations agree with one
process to 2e-16 (MAML, FOMAML, Meta-SGD, LSTM) and 1e-9 (Reptile, Omniglot's conv biases);
tests/test_distributed.py asserts 1e-6 for every family at P = 2 and 3. float32 runs with different
P are equal in distribution, not bit for bit; a given P is deterministic on the CPU.

Faults. A rank that raises prints what and where and exits non-zero; when a process dies, the
other ranks' collectives fail at once (or after `--timeout` seconds for a rank that hangs), they say
so and exit, and torchrun's summary names every failed rank (exit code or signal). Checkpoints are
atomic; a rerun, or torchrun's `--max-restarts`, continues from the newest one to the same final
parameters as an uninterrupted run (`rundir.py`).

Backends: gloo on the CPU; nccl for `device = 'cuda'` (one GPU per rank, `LOCAL_RANK`).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import algorithms, models, partition, seeding
from ..config import Config, ConfigError
from ..optim import Params, adam_init
from ..results import save_meta_model
from ..tasks import Episode, TaskSource
from . import rundir
from .rundir import Options, Refused, State

FAULT_ENV = "FEDMETA_DISTRIBUTED_FAULT"  # tests only: "raise:RANK:ITERATION" or "kill:RANK:ITERATION"


class PeerLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network failed."""


# --- the arithmetic (pure) -------------------------------------------------------------------------------
def shares(total: int, size: int) -> list[slice]:
    """Contiguous shares of `total` tasks over `size` ranks, larger first, sizes differing by at most
    one: 25 on 2 -> [0:13], [13:25]."""
    if total < size:
        raise ConfigError(f"meta-batch-size = {total} is smaller than the {size} ranks: every rank needs a task")
    base, extra = divmod(total, size)
    bounds = [r * base + min(r, extra) for r in range(size + 1)]
    return [slice(bounds[r], bounds[r + 1]) for r in range(size)]


def pack(grads: Params, loss: float, num_tasks: int) -> torch.Tensor:
    """[n g (every coordinate, in key order), n loss, n]: one float64 vector on the gradients' device.

    Summed over ranks it holds the task-weighted sums. float64, so that combining float32 shares adds
    no rounding but the final cast (n g is exact for a float32 g and n < 2^29)."""
    flat = [g.detach().reshape(-1).to(torch.float64) for g in grads.values()]
    tail = torch.tensor([loss, 1.0], dtype=torch.float64, device=flat[0].device)
    return torch.cat([*flat, tail]) * num_tasks


def unpack(total: torch.Tensor, like: Params) -> tuple[Params, float, int]:
    """Summed `pack`s -> (task-weighted mean gradient in `like`'s dtypes and shapes, mean loss, tasks)."""
    tasks = total[-1]
    mean = total / tasks
    grads, start = {}, 0
    for k, v in like.items():
        grads[k] = mean[start:start + v.numel()].reshape(v.shape).to(v.dtype)
        start += v.numel()
    return grads, float(mean[-2]), round(float(tasks))


# --- the process group ------------------------------------------------------------------------------------
@dataclass
class Comm:
    """This process's place in the job and the collectives the training loop uses (no-ops for one rank)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reduce_seconds: float = 0.0  # in all_reduce of meta-gradients (includes waiting for the slowest rank)

    @property
    def where(self) -> str:
        return f"rank {self.rank} of {self.size} (local rank {self.local_rank} on {socket.gethostname()})"

    def _collective(self, what: str, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except RuntimeError as err:  # gloo / nccl: DistBackendError, connection closed by peer, timeout
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise PeerLost(f"{what} failed ({type(err).__name__}: {first}): another rank failed, was killed "
                           "or hung (the launcher's summary names it)") from err

    def reducer(self, total_tasks: int) -> Callable[[Params, float, int], tuple[Params, float]] | None:
        """`Algorithm.train`'s `reduce`: the task-weighted mean of every rank's meta-gradient and loss."""
        if self.size == 1:
            return None

        def reduce(grads: Params, loss: float, num_tasks: int) -> tuple[Params, float]:
            buf = pack(grads, loss, num_tasks)
            t = time.perf_counter()
            self._collective("all_reduce of the meta-gradients", lambda: dist.all_reduce(buf))
            self.reduce_seconds += time.perf_counter() - t
            grads, loss, tasks = unpack(buf, grads)
            if tasks != total_tasks:
                raise RuntimeError(f"the ranks' shares hold {tasks} tasks, not the meta-batch's {total_tasks}")
            return grads, loss

        return reduce

    def from_rank0(self, obj: Any, what: str) -> Any:
        """Rank 0's `obj` on every rank (pickled; CPU tensors inside travel too)."""
        if self.size == 1:
            return obj
        box = [obj]
        self._collective(f"broadcast of {what}", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def check_identical(self, params: Params, iteration: int) -> None:
        """Raise unless every rank holds bit-identical meta-parameters."""
        if self.size == 1:
            return
        mine = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params.values()])
        ref = mine.clone()
        self._collective("broadcast of the meta-parameters", lambda: dist.broadcast(ref, src=0))
        bad = torch.tensor([0.0 if torch.equal(ref, mine) else 1.0], device=mine.device)
        self._collective("all_reduce of the consistency flag", lambda: dist.all_reduce(bad))
        if float(bad):
            raise RuntimeError(f"{int(bad)} rank(s) hold meta-parameters other than rank 0's after "
                               f"meta-iteration {iteration}")


def resolve_device(cfg: Config, local_rank: int) -> torch.device:
    """cfg.device for this rank: "cuda" is GPU `local_rank` (made the current device, so that the
    core's "cuda" is this rank's GPU too); asking for cuda without one is an error."""
    name = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    if name in ("cpu", "auto"):
        return torch.device("cpu")
    if name != "cuda":
        raise ConfigError(f"device = {name!r}: under torchrun every rank uses GPU LOCAL_RANK; use device = 'cuda'")
    if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(f"device = 'cuda': local rank {local_rank} needs GPU {local_rank} (one rank per GPU); "
                          f"torch sees {found}")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def join(cfg: Config, timeout_s: float) -> Comm:
    """Join the torchrun job (env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or
    make a one-process world without torchrun. Backend: nccl on cuda, gloo on the CPU."""
    rank, size, local_rank = (int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = resolve_device(cfg, local_rank)
    if "WORLD_SIZE" in os.environ:
        timeout = timedelta(seconds=timeout_s)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's restarts share its store: without a prefix per attempt a restarted rank can read the
        # previous attempt's (dead) peer addresses and fail to connect ("Connection refused")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(
            f"fedmeta-attempt-{attempt}", store), rank=rank, world_size=size, timeout=timeout)
    return Comm(rank, max(size, 1), local_rank, device)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- one run ---------------------------------------------------------------------------------------------
def setup(cfg: Config, dtype: torch.dtype = torch.float32) -> tuple[algorithms.Algorithm, TaskSource]:
    """The algorithm (its model in `dtype`) and the whole task family, as central training builds them."""
    model = models.build(models.model_name(cfg), cfg).to(dtype)
    return algorithms.build(cfg, model), partition.full_source(cfg)


def fresh_state(cfg: Config, algo: algorithms.Algorithm) -> State:
    """Iteration 0: the seeded initialisation, a fresh Adam, the start of the "train" task stream."""
    params = algo.init(seeding.generator(cfg.seed, "init"))
    return State(0, params, adam_init(params), seeding.generator(cfg.seed, "train").get_state())


def sampler(cfg: Config, source: TaskSource, stream: torch.Generator, dtype: torch.dtype,
            device: torch.device) -> Callable[[int], Episode]:
    """The stream's next whole meta-batch, its floating tensors in `dtype`, on `device`."""

    def sample(_: int) -> Episode:
        episode = source.sample(cfg.meta_batch_size, cfg.shots, cfg.query_shots, stream)
        return Episode(*(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in episode))

    return sample


def run(cfg: Config, opts: Options, comm: Comm) -> Params:
    """Meta-train to `opts.iterations` meta-iterations with this rank's shares; the final meta-parameters."""
    algo, source = setup(cfg, opts.dtype)
    reply: State | str | None = None
    if comm.rank == 0:  # rank 0 owns the directory: its start state (or its refusal) goes to every rank
        try:
            backend = dist.get_backend() if dist.is_initialized() else None
            reply = rundir.prepare(cfg, opts, comm.size, backend, lambda: fresh_state(cfg, algo))
        except (Refused, OSError) as err:
            reply = str(err) if isinstance(err, Refused) else f"{type(err).__name__}: {err}"
    reply = comm.from_rank0(reply, "the start state")
    if isinstance(reply, str):
        raise Refused(reply)
    try:
        params = _train(cfg, opts, comm, algo, source, reply.to(comm.device))
    except BaseException as err:  # the directory is this run's now: say that it failed, then fail
        if comm.rank == 0:
            rundir.write_status(opts.out, "failed", error=f"{type(err).__name__}: {err}", rank=comm.rank)
        raise
    if comm.rank == 0:
        save_meta_model(opts.out / "model.pt", params, cfg, opts.iterations)
        rundir.write_status(opts.out, "completed", iterations=opts.iterations, world_size=comm.size)
    return params


def _train(cfg: Config, opts: Options, comm: Comm, algo: algorithms.Algorithm, source: TaskSource,
           state: State) -> Params:
    """The meta-iterations from `state` on; rank 0 writes a row per iteration and the checkpoints."""
    share = shares(cfg.meta_batch_size, comm.size)[comm.rank]
    stream = torch.Generator().set_state(state.stream)
    sample, reduce = sampler(cfg, source, stream, opts.dtype, comm.device), comm.reducer(cfg.meta_batch_size)
    params, adam, t_start = state.params, state.adam, time.perf_counter()
    for iteration in range(state.iteration + 1, opts.iterations + 1):
        _inject_fault(comm.rank, iteration)
        t, comm.reduce_seconds = time.perf_counter(), 0.0
        params, adam, curve = algo.train(params, adam, sample, 1, reduce=reduce, share=share)
        seconds = time.perf_counter() - t
        if comm.rank == 0:
            rundir.append_row(opts.out, {"iteration": iteration, "loss": curve[0], "seconds": seconds,
                                         "reduce_seconds": comm.reduce_seconds, "world_size": comm.size})
            if opts.log_every and iteration % opts.log_every == 0:
                per_it = (time.perf_counter() - t_start) / (iteration - state.iteration)
                print(f"fedmeta.distributed: iteration {iteration}/{opts.iterations} loss {curve[0]:.5g} "
                      f"({per_it:.3g} s/it)", flush=True)
        if iteration == opts.iterations or (opts.checkpoint_every and iteration % opts.checkpoint_every == 0):
            comm.check_identical(params, iteration)
            if comm.rank == 0:
                rundir.save_checkpoint(opts, cfg, State(iteration, params, adam, stream.get_state()), comm.size)
    if state.iteration == opts.iterations:  # nothing left to do (a finished run, rerun): still check
        comm.check_identical(params, opts.iterations)
    return params


def _inject_fault(rank: int, iteration: int) -> None:
    """Tests only: FEDMETA_DISTRIBUTED_FAULT = "raise|kill:RANK:ITERATION" fails that rank just before
    that meta-iteration, in the first attempt of a torchrun job (not in the restarts it makes)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kind, at_rank, at_iteration = spec.split(":")
    if int(at_rank) == rank and int(at_iteration) == iteration:
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault {FAULT_ENV}={spec}")


__all__ = ["Comm", "Options", "PeerLost", "Refused", "State", "join", "leave", "pack", "run", "setup", "shares",
           "unpack"]
