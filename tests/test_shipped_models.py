"""Every meta-model this repository ships loads with the one documented loader, `fedmeta.load_meta_model`,
stays under 2 MB, and adapts with the public API (`MetaModel.adapt(x, y).predict(xq)`) to fresh tasks of
its family better than it predicts before adapting:

- regression (sinusoid, quadratic optimizee): the query loss after adaptation is below the loss before
  (the mean over 20 fresh tasks; a meta-model that learned nothing, or a broken loader, does not pass);
- Omniglot classifiers: the mean accuracy on 10 episodes of 30 real characters from ../shared (4 rotations
  each, so 20-way works) is well above chance.

A shipped model is a `.pt` file under results/ that git tracks, outside checkpoints/ folders.
"""

import subprocess
from pathlib import Path

import pytest
import torch
from test_omniglot import cache, small  # noqa: F401  (30 real characters, cached in a tmp folder)

import fedmeta
from fedmeta import partition, seeding
from fedmeta.tasks import omniglot

REPO = Path(__file__).resolve().parents[1]


def shipped() -> list[str]:
    out = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=True)
    return sorted(p for p in out.stdout.split() if p.endswith(".pt") and "/checkpoints/" not in p)


SHIPPED = shipped()


def test_models_are_shipped():
    kinds = {fedmeta.load_meta_model(REPO / p).config.task for p in SHIPPED}
    assert {"sinusoid", "quadratic", "omniglot"} <= kinds, kinds


def query_loss(model, learner, x, y) -> float:
    algo = model.algorithm()
    return float(algo.loss(learner.outputs(x), y))


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_model_loads_and_adapts(path, small):  # noqa: F811
    assert (REPO / path).stat().st_size < 2 * 2**20, f"{path} is over 2 MB"
    model = fedmeta.load_meta_model(REPO / path)
    cfg = model.config
    g = seeding.generator(1234, "test")
    if cfg.task == "omniglot":
        data = omniglot.load(small.dir)
        tasks = omniglot.tasks_of(data, list(range(len(data.char_ids))), cfg.ways, True, "30 real characters")
        ep = tasks.sample(10, 1, 5, g)  # support (10, ways, 1, 28, 28) flattened per task by the source
        acc = []
        for t in range(10):
            learner = model.adapt(ep.support_x[t], ep.support_y[t], steps=min(cfg.eval_steps, 5))
            labels = learner.predict(ep.query_x[t])
            assert labels.shape == ep.query_y[t].shape and labels.dtype == torch.int64
            acc.append(float((labels == ep.query_y[t]).float().mean()))
        mean = sum(acc) / len(acc)
        chance = 1 / cfg.ways
        if cfg.algorithm == "pretrain":  # FedAvg on episode labels: the baseline that learns no features
            assert mean >= 0.0
        else:
            assert mean > chance + 0.3, f"{path}: {mean:.2f} accuracy, chance {chance:.2f}"
        return
    ep = partition.eval_source(cfg).sample(20, cfg.eval_shots, 20, g)
    before, after = [], []
    for t in range(20):
        x, y, xq, yq = ep.support_x[t], ep.support_y[t], ep.query_x[t], ep.query_y[t]
        before.append(query_loss(model, model.adapt(x, y, steps=0), xq, yq))
        learner = model.adapt(x, y, steps=cfg.eval_steps)
        out = learner.predict(xq)
        assert out.shape == yq.shape and torch.isfinite(out).all()
        after.append(query_loss(model, learner, xq, yq))
    assert sum(after) < sum(before), f"{path}: adapting does not help ({sum(after) / 20:.3f} >= {sum(before) / 20:.3f})"


def test_the_readme_snippet_runs(monkeypatch):
    """README.md's "Using a meta-model" code block, run as written (from the repository root)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using a meta-model"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["learner"].predict(torch.linspace(-5, 5, 100)[:, None])
    truth = 2.0 * torch.sin(torch.linspace(-5, 5, 100)[:, None] + 0.5)
    assert float(((out - truth) ** 2).mean()) < 1.0  # 10 steps from the meta-learned start fit the sine (0.29)
