"""The `device` key (fedmeta/devices.py, fedmeta/local.py): resolved once, refused clearly when CUDA is
asked for and torch sees none, it reaches the algorithm; training and evaluation receive everything
on that device and return everything on the CPU. Parametrized over the devices this machine has (the
CPU; CUDA too where torch sees it), so the same tests run the GPU path on a GPU machine."""

import ast
import math
from pathlib import Path

import pytest
import torch

from fedmeta import algorithms, devices, local, partition, seeding
from fedmeta.config import Config, ConfigError
from fedmeta.optim import adam_init

REPO = Path(__file__).resolve().parents[1]
HERE = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_resolve(monkeypatch):
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"device = '{name}', but torch sees no CUDA device"):
            devices.resolve(name)
    with pytest.raises(ConfigError, match="device = 'gpu': must be 'cpu', 'cuda', 'cuda:N' or 'auto'"):
        devices.resolve("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve("auto") == torch.device("cuda")  # nothing is allocated: only resolved
    with pytest.raises(ConfigError, match="device = 'cuda:1', but torch sees 1 CUDA device"):
        devices.resolve("cuda:1")


def test_the_device_key_reaches_the_algorithm(monkeypatch):
    algo = algorithms.build(Config(device="auto"))
    assert algo.device == devices.resolve("auto")
    assert {p.device for p in algo.model.parameters()} == {algo.device}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device = 'cuda'.*torch sees no CUDA"):
        algorithms.build(Config(device="cuda"))


def test_to_and_cpu_keep_structure():
    state = adam_init({"w": torch.ones(2)})
    moved = devices.to({"params": {"w": torch.ones(2)}, "adam": state, "list": [torch.zeros(1), 3]}, "cpu")
    assert moved["adam"]["step"] == 0 and moved["list"][1] == 3 and torch.equal(moved["params"]["w"], torch.ones(2))
    ep = local.eval_episode(Config(eval_tasks=2), partition.full_source(Config()), 0)
    assert type(devices.cpu(ep)) is type(ep) and all(a is b for a, b in zip(devices.cpu(ep), ep))  # no copy


class Spy:
    """An algorithm that records the devices of what it is given (a "meta" device: no data, so any
    tensor left on the CPU would show), and returns CPU tensors."""

    device = torch.device("meta")

    def __init__(self, real):
        self.real, self.seen = real, []

    def draw(self, source, generator):
        return self.real.draw(source, generator)

    def _record(self, *trees):
        for tree in trees:
            stack = [tree]
            while stack:
                t = stack.pop()
                if isinstance(t, torch.Tensor):
                    self.seen.append(t.device.type)
                elif isinstance(t, dict):
                    stack += list(t.values())
                elif isinstance(t, (list, tuple)):
                    stack += list(t)

    def train(self, meta_params, opt_state, sample, iterations, **options):
        self._record(meta_params, opt_state, *(sample(i) for i in range(iterations)))
        zeros = {k: torch.zeros(v.shape) for k, v in meta_params.items()}
        return zeros, adam_init(zeros), [0.0] * iterations

    def meta_gradient(self, meta_params, episode):
        self._record(meta_params, episode)
        return {k: torch.zeros(v.shape) for k, v in meta_params.items()}, 0.0


@pytest.mark.parametrize("fusion", ["average", "meta-gradient"])
def test_training_receives_everything_on_the_algorithms_device(fusion):
    cfg = Config(local_iterations=2, meta_batch_size=3, fusion=fusion)
    real = local.algorithm(cfg)
    c = local.client(cfg, 0, 3)
    spy = Spy(real)
    meta = real.init(seeding.generator(0, "init"))
    out = local.train(local.Client(cfg, 0, 3, spy, c.source), meta, 1, adam_init(meta))
    assert spy.seen and set(spy.seen) == {"meta"}
    # every tensor arrived there: average: meta-parameters, the kept Adam's two moments, 2 episodes of 4
    # tensors; meta-gradient: per episode, the meta-parameters and its 4 tensors
    n = len(meta)
    assert len(spy.seen) == (3 * n + 2 * 4 if fusion == "average" else 2 * (n + 4))
    assert all(v.device.type == "cpu" for v in out.arrays.values())


@pytest.mark.parametrize("device", HERE)
@pytest.mark.parametrize("algorithm", ["maml", "lstm"])
def test_train_and_evaluate_return_cpu_tensors(device, algorithm):
    cfg = Config(device=device, algorithm=algorithm, local_iterations=2, meta_batch_size=3, eval_tasks=4,
                 lstm_horizon=4, lstm_unroll=2)
    c = local.client(cfg, 0, 3)
    assert c.algo.device.type == device
    meta = c.algo.init(seeding.generator(0, "init"))  # drawn on the CPU
    assert all(v.device.type == "cpu" for v in meta.values())
    out = local.train(c, meta, 1)
    assert all(v.device.type == "cpu" for v in out.arrays.values())
    state = out.optimizer_state
    assert all(v.device.type == "cpu" for part in ("exp_avg", "exp_avg_sq") for v in state[part].values())
    steps = 2 * (1 if algorithm == "maml" else cfg.lstm_horizon // cfg.lstm_unroll)  # Adam steps per round
    assert state["step"] == steps
    again = local.train(c, out.arrays, 2, state)  # the kept Adam state goes back in
    assert again.optimizer_state["step"] == 2 * steps
    ev = local.evaluate(c, out.arrays)
    assert isinstance(ev.loss_post, float) and math.isfinite(ev.loss_post)
    full = algorithms.evaluate(c.algo, out.arrays, local.eval_episode(cfg, c.source, 0), 2)
    assert full.loss.device.type == "cpu"
    if device != "cpu":  # the same numbers as on the CPU, up to the kernels' rounding
        cpu = local.client(cfg.replace(device="cpu"), 0, 3)
        ref = local.train(cpu, meta, 1)
        for k in meta:
            torch.testing.assert_close(out.arrays[k], ref.arrays[k], rtol=1e-4, atol=1e-5)


def _factory_calls_without_device(path: Path) -> list[str]:
    """torch.zeros / ones / empty / full / arange / eye / tensor / rand* calls without `device=`."""
    factories = {"zeros", "ones", "empty", "full", "arange", "eye", "tensor", "rand", "randn", "randint", "linspace"}
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in factories
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_fast_paths_make_no_cpu_tensors():
    """The Conv4 and MLP fast paths build every tensor from their inputs (or with their device), so
    they run where the inputs are."""
    for name in ("grouped.py", "fast.py", "adapt.py", "pretrain.py"):
        assert _factory_calls_without_device(REPO / "fedmeta" / "algorithms" / name) == []
    assert _factory_calls_without_device(REPO / "tests" / "test_devices.py")  # the scan finds them
