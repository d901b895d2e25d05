"""fedmeta.use: adapt a saved meta-model to a support set and predict, through `fedmeta.load_meta_model`.

Every case saves a model with `save_meta_model`, loads it back as a user would, and checks the adapted
model against `fedmeta.algorithms.evaluate` on the same task (the evaluation protocol's adapted model) and,
where the rule is simple, against a hand-written torch.autograd loop of the rule:
- regression: the sinusoid MLP under MAML (SGD at inner-lr) and Meta-SGD (learned per-coordinate rates),
  and the LSTM optimizer on a quadratic (its own learned updates from its seeded fresh start);
- classification: MAML's Conv4 on Omniglot-shaped images, and pretrain-global (a zero head fine-tuned);
- bad shapes, dtypes, labels and steps raise ValueError naming the argument and the expected shape.
"""

import pytest
import torch
from test_omniglot import cache, small  # noqa: F401  (a small Omniglot set, cached in a tmp folder)

import fedmeta
from fedmeta import algorithms, seeding
from fedmeta.config import Config
from fedmeta.results import save_meta_model
from fedmeta.tasks import Episode
from fedmeta.tasks.omniglot import OmniglotTasks
from fedmeta.tasks.quadratic import QuadraticTasks
from fedmeta.tasks.sinusoid import SinusoidTasks
from fedmeta.use import Learner


def saved(tmp_path, cfg: Config, perturb: float = 0.0):
    """A meta-model of cfg's algorithm (seeded init, optionally perturbed), saved and loaded back."""
    params = algorithms.build(cfg).init(seeding.generator(cfg.seed, "init"))
    g = torch.Generator().manual_seed(7)
    params = {k: v + perturb * torch.randn(v.shape, generator=g) for k, v in params.items()}
    return fedmeta.load_meta_model(save_meta_model(tmp_path / "model.pt", params, cfg))


def one_task(episode: Episode, t: int = 0) -> Episode:
    return Episode(*(x[t:t + 1] for x in episode))


def hand_sgd(model, x, y, rates, steps: int) -> dict:
    """`steps` plain autograd steps p <- p - rate_p * dL/dp on the support loss, from the learned init."""
    algo = model.algorithm()
    p = {k: v.clone().requires_grad_() for k, v in algo.model_params(model.params).items()}
    for _ in range(steps):
        grads = torch.autograd.grad(algo.task_loss(p, x, y), list(p.values()))
        p = {k: (v - rates(k) * gk).detach().requires_grad_() for (k, v), gk in zip(p.items(), grads)}
    return {k: v.detach() for k, v in p.items()}


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_regression_matches_evaluate_and_the_inner_rule_by_hand(tmp_path, algorithm):
    cfg = Config(task="sinusoid", algorithm=algorithm, inner_lr=0.02, eval_steps=4)
    # Meta-SGD: distinct learned rates per coordinate, so that using inner-lr instead would show
    model = saved(tmp_path, cfg, perturb=0.0)
    if algorithm == "metasgd":
        g = torch.Generator().manual_seed(3)
        model = model.__class__(model.config, {k: (0.005 + 0.03 * torch.rand(v.shape, generator=g)
                                                   if k.startswith("alpha/") else v)
                                               for k, v in model.params.items()}, model.module, model.round)
    ep = one_task(SinusoidTasks().sample(1, 5, 50, seeding.generator(1, "test")))
    xs, ys, xq, yq = (t[0] for t in ep)  # (5, 1), (5, 1), (50, 1), (50, 1)
    for steps in (0, 1, 4):
        learner = model.adapt(xs, ys, steps=steps)
        assert isinstance(learner, Learner) and learner.steps == steps and not learner.classification
        pred = learner.predict(xq)
        assert pred.shape == (50, 1) and pred.dtype == torch.float32
        algo = model.algorithm()
        ev = algorithms.evaluate(algo, model.params, ep, steps)
        torch.testing.assert_close(algo.loss(pred, yq), ev.loss[steps, 0], rtol=1e-6, atol=1e-7)
        rates = (lambda k: model.params["alpha/" + k]) if algorithm == "metasgd" else (lambda k: cfg.inner_lr)
        by_hand = hand_sgd(model, xs, ys, rates, steps)
        torch.testing.assert_close(pred, algo.forward(by_hand, xq), rtol=1e-5, atol=1e-6)
    # steps defaults to the configured evaluation steps; numpy inputs work too
    assert model.adapt(xs.numpy(), ys.numpy()).steps == 4
    torch.testing.assert_close(model.adapt(xs.numpy(), ys.numpy()).predict(xq.numpy()),
                               model.adapt(xs, ys, steps=4).predict(xq))
    # the module-level function and the lazily exported one are the same thing
    torch.testing.assert_close(fedmeta.adapt(model, xs, ys, 1).predict(xq), model.adapt(xs, ys, 1).predict(xq))


def test_lstm_optimizer_regression_matches_evaluate(tmp_path):
    cfg = Config(task="quadratic", algorithm="lstm", quadratic_dim=4, eval_steps=6)
    model = saved(tmp_path, cfg)
    ep = QuadraticTasks(4).sample(1, generator=seeding.generator(2, "test"))  # W (1, 4, 4), y (1, 4, 1)
    learner = model.adapt(ep.support_x[0], ep.support_y[0])  # the default start: the "eval" stream, as evaluate
    algo = model.algorithm()
    ev = algorithms.evaluate(algo, model.params, ep, 6)
    pred = learner.predict(ep.query_x[0])
    assert pred.shape == (4, 1)
    torch.testing.assert_close(algo.loss(pred, ep.query_y[0]), ev.loss[6, 0], rtol=1e-5, atol=1e-6)
    assert float(ev.loss[6, 0]) != float(ev.loss[0, 0])  # it did adapt


def synthetic(classes: int, ways: int) -> OmniglotTasks:
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(classes, 20, 28, 28, generator=g) > 0.8).to(torch.uint8) * 255
    return OmniglotTasks(images, torch.arange(1, classes + 1), torch.zeros(classes, dtype=torch.int64), ways)


def test_classification_labels_match_evaluate(tmp_path):
    cfg = Config(task="omniglot", ways=3, shots=1, query_shots=5, inner_lr=0.4, eval_steps=3)
    model = saved(tmp_path, cfg, perturb=0.05)
    ep = synthetic(9, 3).sample(4, 1, 5, seeding.generator(0, "test"))  # 4 tasks: support (4, 3, 1, 28, 28)
    algo = model.algorithm()
    ev = algorithms.evaluate(algo, model.params, ep, 3)
    for t in range(4):
        learner = model.adapt(ep.support_x[t], ep.support_y[t], steps=3)
        labels = learner.predict(ep.query_x[t])  # the whole query set at once: batch norm sees all of it
        assert labels.shape == (15,) and labels.dtype == torch.int64 and learner.classification
        assert float((labels == ep.query_y[t]).float().mean()) == float(ev.accuracy[3, t])
        torch.testing.assert_close(algo.loss(learner.outputs(ep.query_x[t]), ep.query_y[t]), ev.loss[3, t],
                                   rtol=1e-5, atol=1e-6)
        # one step by hand: SGD at inner-lr from the learned initialisation
        one = model.adapt(ep.support_x[t], ep.support_y[t], steps=1)
        by_hand = hand_sgd(model, ep.support_x[t], ep.support_y[t], lambda k: 0.4, 1)
        torch.testing.assert_close(one.outputs(ep.query_x[t]), algo.forward(by_hand, ep.query_x[t]),
                                   rtol=1e-4, atol=1e-5)


def test_pretrain_global_fine_tunes_a_zero_head(tmp_path, small):  # noqa: F811
    cfg = Config(task="omniglot", data_dir=str(small.dir), omniglot_split="alphabet", algorithm="pretrain-global",
                 ways=3, shots=1, query_shots=2, inner_lr=0.1, eval_steps=2, heldout_partitions=2)
    model = saved(tmp_path, cfg, perturb=0.01)
    assert model.params["head.weight"].shape[0] == 72  # the global classes of the small set
    ep = synthetic(9, 3).sample(2, 1, 2, seeding.generator(1, "test"))
    ev = algorithms.evaluate(model.algorithm(), model.params, ep, 2)
    for t in range(2):
        learner = model.adapt(ep.support_x[t], ep.support_y[t])
        assert learner.params["head.weight"].shape == (3, 64)  # a fresh 3-way head, fine-tuned
        labels = learner.predict(ep.query_x[t])
        assert labels.shape == (6,) and int(labels.max()) < 3
        assert float((labels == ep.query_y[t]).float().mean()) == float(ev.accuracy[2, t])
    zero = model.adapt(ep.support_x[0], ep.support_y[0], steps=0)
    assert torch.equal(zero.outputs(ep.query_x[0]), torch.zeros(6, 3))  # the zero head before any step


def test_bad_shapes_and_values_are_clear_errors(tmp_path):
    reg = saved(tmp_path / "r", Config(task="sinusoid"))
    x, y = torch.zeros(5, 1), torch.zeros(5, 1)
    with pytest.raises(ValueError, match=r"x has shape \(5,\); this MLP takes \(examples, 1\)"):
        reg.adapt(torch.zeros(5), y)
    with pytest.raises(ValueError, match=r"y has shape \(5,\); this regressor takes \(shots, 1\).*y\[:, None\]"):
        reg.adapt(x, torch.zeros(5))
    with pytest.raises(ValueError, match="x holds 5 examples but y holds 4"):
        reg.adapt(x, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="steps = -1: must be an integer >= 0"):
        reg.adapt(x, y, steps=-1)
    with pytest.raises(ValueError, match="y holds non-finite values"):
        reg.adapt(x, torch.full((5, 1), float("nan")))
    with pytest.raises(ValueError, match=r"x has shape \(3, 2\)"):
        reg.adapt(x, y, steps=1).predict(torch.zeros(3, 2))
    cls = saved(tmp_path / "c", Config(task="omniglot", ways=3, shots=1, query_shots=1))
    img = torch.zeros(3, 1, 28, 28)
    with pytest.raises(ValueError, match=r"x has shape \(3, 28, 28\); this Conv4 takes \(examples, 1, 28, 28\)"):
        cls.adapt(torch.zeros(3, 28, 28), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"takes \(shots,\) integer labels in 0..2"):
        cls.adapt(img, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"y holds labels \[0, 1, 3\]; this 3-way classifier takes labels in 0..2"):
        cls.adapt(img, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="x has dtype torch.uint8; the model takes floating-point inputs"):
        cls.adapt(img.to(torch.uint8), torch.tensor([0, 1, 2]))
