"""`algorithm = "pretrain-global"` (fedmeta/algorithms/pretrain.py): Chen et al. 2019's "Baseline" as an
algorithm of the core. On the small Omniglot set of test_omniglot (3 background alphabets of 6
characters: ids 1-18, 4 rotations each -> 72 global classes; 2 evaluation alphabets: ids 19-30):

- the global label of a class is its rank in (character id, quarter turns) order, on every client;
- training draws labelled images as the in-process FedAvg of experiments/omniglot_federated.py did,
  and one step is one plain torch Adam step on the cross-entropy;
- evaluation swaps in a zero `ways`-way head and fine-tunes the whole network with the inner rule.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_omniglot import cache, small  # noqa: F401  (the small data set, cached in a tmp folder)

from fedmeta import algorithms, local, partition, seeding
from fedmeta.algorithms.pretrain import PretrainGlobal
from fedmeta.config import Config, ConfigError
from fedmeta.tasks import families


def _cfg(small, **changes):  # noqa: F811
    return Config(task="omniglot", data_dir=str(small.dir), omniglot_split="alphabet", algorithm="pretrain-global",
                  ways=5, shots=1, query_shots=1, meta_batch_size=2, heldout_partitions=2, **changes)


def test_global_labels_are_shared_by_every_client(small):  # noqa: F811
    cfg = _cfg(small)
    assert families.global_classes(cfg) == 18 * 4
    parts = [partition.task_source(cfg, p, 5) for p in range(5)]  # 3 training clients, one alphabet each
    for p in range(3):  # client p owns characters 6p+1 .. 6p+6: labels 24p .. 24p + 23
        assert parts[p].labels.tolist() == list(range(24 * p, 24 * p + 24))
    known = parts[1]
    row = int(((known.char_ids == 8) & (known.turns == 2)).nonzero())
    assert int(known.labels[row]) == (8 - 1) * 4 + 2  # character 8 rotated twice: label 30
    assert parts[3].labels is None and parts[4].labels is None  # held-out clients never train
    with pytest.raises(ValueError, match="no global labels"):
        parts[3].sample_labelled(4, seeding.generator(0, "test"))
    central = partition.full_source(cfg)  # the alphabet split's meta-train set: the same space
    assert central.labels.tolist() == list(range(72))
    assert families.global_classes(cfg.replace(omniglot_rotations=False)) == 18
    assert partition.task_source(cfg.replace(partition="iid"), 0, 5).labels.tolist() == list(range(72))


def test_training_batches_are_labelled_images(small):  # noqa: F811
    cfg = _cfg(small)
    algo = algorithms.build(cfg)
    src = partition.task_source(cfg, 1, 5)
    ep = algo.draw(src, seeding.generator(0, "train", 1, 1))
    n = 2 * 5 * (1 + 1)  # meta-batch x ways x (shots + query): the images of a meta-batch of episodes
    assert [tuple(t.shape) for t in ep] == [(1, n, 1, 28, 28), (1, n), (1, 0, 1, 28, 28), (1, 0)]
    g = seeding.generator(0, "train", 1, 1)  # the draw of the experiment's in-process FedAvg
    cls, draw = torch.randint(src.num_classes, (n,), generator=g), torch.randint(20, (n,), generator=g)
    assert torch.equal(ep.support_y[0], cls + 24)  # client 1's offset in the global space
    assert torch.equal(ep.support_x[0], src.images[cls, draw].unsqueeze(1).float() / 255)
    # what local.train draws for the client is the same
    same = local.train_episodes(cfg, src, 1, 1, 1, algo)[0]
    assert all(torch.equal(a, b) for a, b in zip(same, ep))
    client = local.client(cfg.replace(local_iterations=2), 1, 5)  # a round of a training client
    out = local.train(client, algo.init(seeding.generator(0, "init")), 1)
    assert out.num_tasks == 2 and out.optimizer_state["step"] == 2 and out.arrays["head.weight"].shape == (72, 64)


def test_one_step_is_a_plain_torch_adam_step(small):  # noqa: F811
    cfg = _cfg(small, meta_lr=0.01)
    algo = algorithms.build(cfg)
    assert algo.model.head.out_features == 72
    meta = algo.init(seeding.generator(0, "init"))
    src = partition.task_source(cfg, 2, 5)
    ep = algo.draw(src, seeding.generator(0, "train", 2, 1))
    new, state, curve = algo.train(meta, None, lambda i: ep, 1)

    model = copy.deepcopy(algo.model)  # a plain loop: load the parameters, cross-entropy, backward, torch's Adam
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(meta[k])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(ep.support_x[0]), ep.support_y[0])  # (images, 72) logits
    loss.backward()
    opt.step()
    assert curve == [pytest.approx(loss.item(), rel=1e-6)]
    for k, p in model.named_parameters():
        torch.testing.assert_close(new[k], p.detach(), rtol=1e-5, atol=1e-7, msg=k)
    assert state["step"] == 1


def test_evaluation_fine_tunes_a_zero_head(small):  # noqa: F811
    cfg = _cfg(small, inner_lr=0.4, eval_steps=2)
    algo = algorithms.build(cfg)
    meta = algo.init(seeding.generator(0, "init"))
    start = algo.start_params(meta, 3)
    assert tuple(start["head.weight"].shape) == (3, 5, 64) and not start["head.weight"].any()
    assert tuple(start["head.bias"].shape) == (3, 5) and not start["head.bias"].any()
    assert torch.equal(start["features.0.weight"][2], meta["features.0.weight"])  # the trained body
    ep = partition.eval_source(cfg).sample(3, 1, 2, seeding.generator(0, "test"))
    ev = algorithms.evaluate(algo, meta, ep, 2)
    torch.testing.assert_close(ev.loss[0], torch.full((3,), math.log(5)))  # zero logits: uniform
    # each step is the inner rule (SGD at inner-lr) on the support set, over the whole network; the first
    # moves the head alone (a zero head passes no gradient back to the body), the second the body too
    params = {k: v[0] for k, v in start.items()}
    for step in (1, 2):
        grads = torch.func.grad(algo.task_loss)(params, ep.support_x[0], ep.support_y[0])
        params = {k: v - 0.4 * grads[k] for k, v in params.items()}
        assert grads["head.weight"].abs().sum() > 0
        assert (grads["features.0.weight"].abs().sum() > 0) == (step == 2)
        torch.testing.assert_close(ev.loss[step, 0], algo.task_loss(params, ep.query_x[0], ep.query_y[0]))
    # a held-out client evaluates the same way (fedmeta.local.evaluate)
    out = local.evaluate(local.client(cfg.replace(eval_tasks=3, eval_shots=1, eval_query_shots=2), 4, 5), meta)
    assert out.loss_pre == pytest.approx(math.log(5)) and out.accuracy_post is not None


def test_needs_a_classification_task():
    with pytest.raises(ConfigError, match="task = 'sinusoid' is not a classification task"):
        algorithms.build(Config(algorithm="pretrain-global"))
    with pytest.raises(ConfigError, match="pretrain-global' needs a classification task"):
        PretrainGlobal(Config(task="quadratic", algorithm="lstm"))
