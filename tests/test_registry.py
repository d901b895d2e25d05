"""The registry of fast meta-gradient paths (fedmeta/algorithms/registry.py):

- `maml.py` imports no path; the paths import MAML (one direction, no circle);
- a subclass that changes nothing a path computes keeps the path (same numbers, bit for bit);
- a subclass that overrides a computed method falls back to the generic path, which honours the
  override, and is told why (an attribute and a logged warning); `same_values` keeps the path;
- a path registered from outside is chosen for what it declares.
"""

import ast
import logging
from pathlib import Path

import torch
from torch.func import grad_and_value

from fedmeta import algorithms, losses, seeding
from fedmeta.algorithms import fast, grouped, registry
from fedmeta.algorithms.maml import MAML
from fedmeta.algorithms.metasgd import MetaSGD
from fedmeta.config import Config
from fedmeta.models import Linear
from fedmeta.tasks import Episode
from fedmeta.tasks.sinusoid import SinusoidTasks

REPO = Path(__file__).resolve().parents[1]


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_maml_imports_no_fast_path():
    pkg = REPO / "fedmeta" / "algorithms"
    assert not {n for n in _imports(pkg / "maml.py") if "fast" in n or "grouped" in n}
    for path in ("fast.py", "grouped.py"):
        assert {"maml.MAML", "registry"} <= _imports(pkg / path)
    assert [p.name for p in registry.PATHS] == ["mlp-closed-form", "conv4-grouped"]


def sinusoid_setting():
    cfg = Config(inner_steps=2, meta_batch_size=4)
    ep = SinusoidTasks().sample(4, 5, 5, seeding.generator(0, "test"))
    return cfg, MAML(cfg).init(seeding.generator(0, "init")), ep


class Logged(MAML):
    """Changes what surrounds the meta-gradient, not its value."""

    name = "logged-maml"

    def train(self, *args, **kwargs):
        self.trained = True
        return super().train(*args, **kwargs)


class CountedForward(MAML):
    """Overrides a computed method without changing its values, and says so."""

    same_values = ("forward",)
    calls = 0

    def forward(self, params, x):
        CountedForward.calls += 1
        return super().forward(params, x)


class L2(MAML):
    """Changes the task loss: the fast paths do not compute this."""

    def task_loss(self, params, x, y):
        return super().task_loss(params, x, y) + 0.1 * sum(p.square().sum() for p in params.values())


def test_a_subclass_that_changes_nothing_computed_keeps_the_fast_path():
    cfg, meta, ep = sinusoid_setting()
    plain, logged = MAML(cfg), Logged(cfg)
    got, want = logged.meta_gradient_fn()(meta, ep), plain.meta_gradient_fn()(meta, ep)
    assert logged.meta_gradient_path == plain.meta_gradient_path == "mlp-closed-form"
    assert all(torch.equal(got[0][k], want[0][k]) for k in meta) and torch.equal(got[1], want[1])
    counted = CountedForward(cfg)
    assert fast.applies(counted) and counted.meta_gradient_fn()(meta, ep)[1] == want[1]
    assert counted.meta_gradient_path == "mlp-closed-form"
    omniglot = Config(task="omniglot")
    assert grouped.applies(Logged(omniglot)) and grouped.applies(CountedForward(omniglot))


def test_a_subclass_that_changes_a_computed_method_is_told_why(caplog):
    cfg, meta, ep = sinusoid_setting()
    algo = L2(cfg)
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        fn = algo.meta_gradient_fn()
    assert algo.meta_gradient_path == "generic"
    assert "overrides task_loss" in algo.fast_path_reasons["mlp-closed-form"]
    assert "L2" in caplog.text and "overrides task_loss" in caplog.text
    grads, loss = fn(meta, ep)
    want_grads, want_loss = grad_and_value(algo.meta_loss)(meta, ep)  # the override is honoured
    assert torch.equal(loss, want_loss) and all(torch.equal(grads[k], want_grads[k]) for k in meta)
    assert loss > MAML(cfg).meta_gradient(meta, ep)[1]  # the penalty is in it
    assert "overrides task_loss" in registry.why_not(grouped.PATH, L2(Config(task="omniglot")))


def test_reasons_name_what_does_not_fit(caplog):
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        algo = MetaSGD(Config(algorithm="metasgd"))
        algo.meta_gradient_fn()
    assert algo.meta_gradient_path == "generic" and not caplog.text  # nothing overridden: no warning
    assert "inner_rule" in algo.fast_path_reasons["mlp-closed-form"]
    assert "loss" in algo.fast_path_reasons["conv4-grouped"]
    reptile = algorithms.build(Config(algorithm="reptile"))
    assert "not a MAML" in registry.why_not(fast.PATH, reptile)


def test_a_registered_path_is_chosen_for_what_it_declares():
    """A closed form for the linear model with the MSE loss, one SGD step, registered from outside:
    L(w) = mean((x w - y)^2) on the query after w' = w - lr * 2/n xs^T (xs w - ys)."""

    def linear_meta_gradient(algo, structure, fallback):
        lr = algo.cfg.inner_lr

        def fn(meta, ep):
            w = meta["theta.weight"].T  # (dim, 1)
            xs, ys, xq, yq = ep  # (tasks, n, dim), (tasks, n, 1), ...
            a = torch.eye(w.shape[0]) - lr * 2 / xs.shape[1] * xs.mT @ xs  # dw'/dw, (tasks, dim, dim)
            w1 = a @ w + lr * 2 / xs.shape[1] * xs.mT @ ys  # (tasks, dim, 1)
            err = xq @ w1 - yq
            g = a.mT @ (2 / err[0].numel() * xq.mT @ err)  # (tasks, dim, 1)
            return {"theta.weight": g.mean(0).T}, err.square().mean((1, 2)).mean()

        return fn

    path = registry.FastPath("linear-test", MAML, ("meta_loss", "forward", "task_loss", "model_params"),
                             {False: (algorithms.Algorithm.inner_rule,)}, losses.mse,
                             lambda m: m if isinstance(m, Linear) else None, linear_meta_gradient)
    registry.register(path)
    try:
        algo = MAML(Config(inner_lr=0.05), Linear(3).double())
        meta = {k: v.detach() for k, v in algo.model.named_parameters()}
        g = seeding.generator(0, "test")
        ep = Episode(*(torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 6, 3), (4, 6, 1)) * 2))
        fn = algo.meta_gradient_fn()
        assert algo.meta_gradient_path == "linear-test"
        got, want = fn(meta, ep), grad_and_value(algo.meta_loss)(meta, ep)
        torch.testing.assert_close(got[0]["theta.weight"], want[0]["theta.weight"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-14)
    finally:
        registry.PATHS.remove(path)
    assert [p.name for p in registry.PATHS] == ["mlp-closed-form", "conv4-grouped"]
