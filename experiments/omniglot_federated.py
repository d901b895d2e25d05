"""Few-shot Omniglot federated by alphabet: FedMeta (Chen et al. 2018, "Federated Meta-Learning
with Fast Convergence and Efficient Communication") against FedAvg (McMahan et al. 2017) and
against every client alone.

Clients: the 30 background alphabets are 30 training clients (one alphabet each, with rotations as
extra classes); `--heldout` more clients own the 20 evaluation alphabets (4 each for 5) and never
train: every `--eval-every` rounds they adapt the global model to their fixed 5-way 1-shot episodes
(1 support + 1 query image per class, 3 steps of alpha = 0.4) and report the accuracy
(`rounds.csv`: eval_accuracy_post). A fraction `--fraction` of the training clients is sampled per
round. Variants, all with the same number of rounds:

1. fedmeta:   MAML (second order, 1 inner step alpha = 0.4), `--local` local meta-iterations of
              `--batch` tasks, meta-models averaged (fusion = "average") - a real Flower simulation;
2. dist-maml: MAML meta-gradients at the global model (`--grad-local` meta-batches each) averaged,
              one server Adam step per round (fusion = "meta-gradient", server-lr) - Flower;
3. fedavg:    `algorithm = pretrain`: a conv4 classifier trained on the episodes' labels, FedAvg,
              then fine-tuned on each held-out support set - Flower. NOTE: the labels of an episode
              are its classes' random positions 0..4, so this classifier has no consistent target
              (its optimum is the uniform prediction) and the variant is close to fine-tuning a random
              init; see 3b and the report.
3b. fedavg-global (no Flower, in this process): the meaningful FedAvg baseline the core does not
              offer yet: a conv4 with one output per training class (every character x rotation of
              the 30 background alphabets, 3856 global labels), FedAvg with the same sampling, local
              Adam steps and images per step as `fedavg`; at test the head is replaced by a zero
              5-way head and the whole network fine-tuned on the support set (Chen et al. 2019,
              "A Closer Look at Few-shot Classification", "Baseline").
4. alone:     no federation: `--alone` training clients (seeded choice) each run central MAML on
              their own alphabet only, `--rounds x --local` meta-iterations (as if sampled every
              round), evaluated on the held-out clients' episodes on the same schedule; mean of them.

Round 0 of every curve is the common random initialisation fine-tuned the same way. For the final
models of fedavg and fedavg-global the fine-tuning (step size, steps) is also tuned on episodes of
the background alphabets (never the held-out ones). Rounds to target: the first evaluated round at
which fedmeta / dist-maml reach a baseline's final held-out accuracy, against the rounds that
baseline needed.

    python experiments/omniglot_federated.py --quick            # smoke run (a few minutes)
    flock /tmp/fedmeta-cpu.lock python experiments/omniglot_federated.py   # the reference run
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad_and_value

from fedmeta import algorithms, local, models, partition, seeding
from fedmeta.config import Config
from fedmeta.optim import Params, adam_init, adam_step
from fedmeta.results import load_meta_model, load_runs, versions

from omniglot_central import DATA, train_central, write_csv
from protocol import machine, write_json
from sinusoid_federated import run as flower_run

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "omniglot_federated"
TRAIN_CLIENTS = 30  # one per background alphabet
RUNS = {
    "fedmeta": "algorithm='maml' fusion='average' local-iterations={local}",
    "dist-maml": "algorithm='maml' fusion='meta-gradient' local-iterations={grad_local} server-lr={server_lr}",
    "fedavg": "algorithm='pretrain' fusion='average' local-iterations={local}",
}
COMMON = ("task='omniglot' data-dir='{data}' ways=5 shots=1 query-shots=1 inner-steps=1 inner-lr=0.4 "
          "meta-lr=0.001 meta-batch-size={batch} eval-shots=1 eval-query-shots=1 eval-steps=3 "
          "eval-tasks={eval_tasks} heldout-partitions={heldout} fraction-train={fraction} min-train-nodes=2 "
          "num-rounds={rounds} eval-every={eval_every} checkpoint-every={rounds} seed={seed} compile={compile} "
          "omniglot-split='character' omniglot-rotations=true")
TUNE_LR = (0.01, 0.04, 0.1, 0.4, 1.0)  # fine-tuning step sizes tried for the FedAvg models
TUNE_STEPS = (1, 3, 5, 10)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run; output in /tmp unless --out")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--local", type=int, default=10, help="local iterations (fedmeta, fedavg, alone)")
    p.add_argument("--grad-local", type=int, default=1, help="meta-batches per dist-maml meta-gradient")
    p.add_argument("--server-lr", type=float, default=0.003, help="dist-maml server Adam step")
    p.add_argument("--batch", type=int, default=8, help="tasks per local iteration")
    p.add_argument("--fraction", type=float, default=0.2, help="training clients sampled per round")
    p.add_argument("--heldout", type=int, default=5, help="held-out clients (the 20 evaluation alphabets)")
    p.add_argument("--eval-tasks", type=int, default=100, help="episodes per held-out client")
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--alone", type=int, default=3, help="clients trained alone")
    p.add_argument("--val-tasks", type=int, default=300, help="background episodes to tune FedAvg fine-tuning")
    p.add_argument("--only", nargs="*", choices=[*RUNS, "fedavg-global", "alone"], help="run only these")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the in-process parts (3b, 4, evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.rounds, args.local, args.batch, args.eval_tasks, args.eval_every = 2, 2, 2, 4, 1
        args.alone, args.val_tasks, args.fraction = 1, 10, 0.07
    if args.out is None:
        args.out = Path("/tmp/omniglot_federated_quick") if args.quick else OUT
    return args


def base_config(args: argparse.Namespace) -> Config:
    """The Flower runs' shared config (as the ServerApp builds it), for evaluation in this process."""
    return Config(task="omniglot", data_dir=args.data_dir, ways=5, shots=1, query_shots=1, inner_steps=1,
                  inner_lr=0.4, meta_lr=1e-3, meta_batch_size=args.batch, eval_shots=1, eval_query_shots=1,
                  eval_steps=3, eval_tasks=args.eval_tasks, heldout_partitions=args.heldout,
                  fraction_train=args.fraction, num_rounds=args.rounds, local_iterations=args.local,
                  eval_every=args.eval_every, seed=args.seed, algorithm="maml",
                  threads=args.threads)  # fedmeta.local.algorithm sets torch's threads from it


# --- held-out evaluation, exactly as the held-out clients do it (fedmeta.local.evaluate) ---------------
def heldout_accuracy(cfg: Config, params: Params, num_partitions: int) -> dict:
    """Task-weighted mean over the held-out clients of their accuracy before/after cfg.eval_steps."""
    total, pre, post = 0, 0.0, 0.0
    for pid in range(num_partitions - cfg.heldout_partitions, num_partitions):
        r = local.evaluate(local.client(cfg, pid, num_partitions), params)
        total += r.num_tasks
        pre += r.num_tasks * r.accuracy_pre
        post += r.num_tasks * r.accuracy_post
    return {"eval_accuracy_pre": pre / total, "eval_accuracy_post": post / total}


def tune_finetuning(cfg: Config, params: Params, episodes) -> dict:
    """Best (inner lr, steps) for fine-tuning `params` on validation episodes (background alphabets)."""
    scores = {}
    for lr in TUNE_LR:
        ev = algorithms.evaluate(algorithms.build(cfg.replace(inner_lr=lr)), params, episodes, max(TUNE_STEPS))
        for k in TUNE_STEPS:
            scores[(lr, k)] = float(ev.accuracy[k].mean())
    (lr, k), best = max(scores.items(), key=lambda kv: kv[1])
    return {"inner_lr": lr, "steps": k, "val_accuracy": best,
            "grid": {f"lr={a} steps={b}": v for (a, b), v in scores.items()}}


# --- 3b: FedAvg of a global-label classifier (in process; the core lacks it) ---------------------------
def global_head_params(params: Params, ways: int) -> Params:
    """The body of a global classifier with a fresh zero `ways`-way head (fine-tuned at test)."""
    out = {k: v for k, v in params.items() if not k.startswith("head.")}
    out["head.weight"] = torch.zeros(ways, params["head.weight"].shape[1])
    out["head.bias"] = torch.zeros(ways)
    return out


def fedavg_global(cfg: Config, num_partitions: int, rounds: int, local_steps: int, fraction: float,
                  eval_every: int, validate) -> tuple[Params, list[dict], float]:
    """FedAvg (weighted by images) of a conv4 over the 3856 global training classes: each sampled
    client takes `local_steps` Adam steps (fresh state, lr = meta-lr, like `algorithm = pretrain`) on
    batches of meta-batch x ways x (shots + query) images of its own classes."""
    t0 = time.perf_counter()
    train_ids = range(partition.num_train_partitions(cfg, num_partitions))
    sources = [partition.task_source(cfg, pid, num_partitions) for pid in train_ids]
    offsets = [0]
    for s in sources:
        offsets.append(offsets[-1] + s.num_classes)
    with torch.random.fork_rng(devices=[]):  # seeded torch default init
        torch.manual_seed(seeding.derive(cfg.seed, "init", 3856))
        model = models.Conv4(offsets[-1])
    params = models.params_of(model)
    per_step = cfg.meta_batch_size * cfg.ways * (cfg.shots + cfg.query_shots)

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    step_fn = grad_and_value(loss)
    curve = [{"round": 0, **validate(global_head_params(params, cfg.ways))}]
    k = max(2, math.ceil(fraction * len(sources)))
    for rnd in range(1, rounds + 1):
        rng = random.Random(seeding.derive(cfg.seed, "train", 10**6 + rnd))  # the strategy's sampling rule
        sampled = sorted(rng.sample(list(train_ids), min(k, len(sources))))
        new, weights, losses = [], [], []
        for pid in sampled:
            src, g = sources[pid], seeding.generator(cfg.seed, "train", pid, rnd)
            p, state = params, adam_init(params)
            for _ in range(local_steps):
                cls = torch.randint(src.num_classes, (per_step,), generator=g)
                draw = torch.randint(src.images.shape[1], (per_step,), generator=g)
                x = src.images[cls, draw].unsqueeze(1).float().div_(255.0)  # (images, 1, 28, 28)
                grads, value = step_fn(p, x, cls + offsets[pid])
                p, state = adam_step(p, grads, state, cfg.meta_lr)
                losses.append(float(value))
            new.append(p)
            weights.append(local_steps * per_step)
        total = sum(weights)
        params = {name: sum(w * q[name] for w, q in zip(weights, new)) / total for name in params}
        if rnd % eval_every == 0 or rnd == rounds:
            row = {"round": rnd, "train_loss": sum(losses) / len(losses),
                   **validate(global_head_params(params, cfg.ways))}
            curve.append(row)
            print("fedavg-global", {a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}, flush=True)
    return params, curve, time.perf_counter() - t0


# --- the experiment -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    out, t_all = args.out, time.perf_counter()
    n = TRAIN_CLIENTS + args.heldout
    cfg = base_config(args)
    want = set(args.only or [*RUNS, "fedavg-global", "alone"])
    fill = dict(local=args.local, grad_local=args.grad_local, server_lr=args.server_lr, batch=args.batch,
                eval_tasks=args.eval_tasks, heldout=args.heldout, fraction=args.fraction, rounds=args.rounds,
                eval_every=args.eval_every, seed=args.seed, compile=str(args.compile).lower(),
                data=Path(args.data_dir).resolve())
    summary = {"command": "python experiments/omniglot_federated.py " + " ".join(args.argv),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "clients": {"train": TRAIN_CLIENTS, "heldout": args.heldout, "num_supernodes": n},
               "seed": args.seed, "machine": machine(), "versions": versions(), "variants": {},
               "load_average_start": os.getloadavg()}
    prev = out / "summary.json"
    if prev.exists():  # keep the variants of an earlier invocation (--only runs them one at a time)
        import json

        summary["variants"] = json.loads(prev.read_text()).get("variants", {})
    curves: dict[str, list[dict]] = {}

    init = algorithms.build(cfg).init(seeding.generator(cfg.seed, "init"))  # the ServerApp's initial model
    round0 = {"round": 0, **heldout_accuracy(cfg, init, n)}

    # 1-3: Flower simulations
    for name, template in RUNS.items():
        if name not in want:
            continue
        overrides = (template + " " + COMMON).format(**fill)
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        wall = flower_run(name, overrides, out, n)
        summary["variants"][name] = {"kind": "flower", "overrides": overrides, "wall_seconds": wall,
                                     "federation": f"num-supernodes={n} client-resources-num-cpus=1"}
    for name in RUNS:
        if (out / "runs" / name / "rounds.csv").exists():
            shutil.copyfile(out / "runs" / name / "rounds.csv", out / f"rounds_{name}.csv")  # runs/ is not committed
            rounds = load_runs([out / "runs" / name]).rounds
            curves[name] = [round0] + [
                {"round": int(r["round"]), "train_loss": r["train_loss"], "eval_accuracy_pre": r["eval_accuracy_pre"],
                 "eval_accuracy_post": r["eval_accuracy_post"]}
                for _, r in rounds.dropna(subset=["eval_accuracy_post"]).iterrows()]

    # validation episodes for tuning the FedAvg fine-tuning: background alphabets, no rotations
    val_src = partition.full_source(cfg.replace(omniglot_split="alphabet", omniglot_rotations=False))
    val = val_src.sample(args.val_tasks, 1, 1, seeding.generator(args.seed, "eval", 800))
    if "fedavg" in want and (out / "runs" / "fedavg" / "model.pt").exists():
        final = load_meta_model(out / "runs" / "fedavg" / "model.pt").params
        summary["variants"]["fedavg"]["tuned"] = tuned(cfg, final, val, n)

    # 3b: FedAvg of a global-label classifier
    if "fedavg-global" in want:
        params, curve, seconds = fedavg_global(cfg, n, args.rounds, args.local, args.fraction, args.eval_every,
                                               lambda p: heldout_accuracy(cfg, p, n))
        summary["variants"]["fedavg-global"] = {
            "kind": "in-process FedAvg emulation (no Flower)", "wall_seconds": seconds,
            "tuned": tuned(cfg, global_head_params(params, cfg.ways), val, n)}
        write_csv(out / "curve_fedavg-global.csv", curve)

    # 4: clients alone
    if "alone" in want:
        rng = random.Random(seeding.derive(args.seed, "partition", 7))
        chosen = sorted(rng.sample(range(TRAIN_CLIENTS), args.alone))
        per_client, t0 = {}, time.perf_counter()
        for pid in chosen:
            src = partition.task_source(cfg, pid, n)
            _, curve, timing = train_central(cfg, src, iterations=args.rounds * args.local, budget_s=0,
                                             eval_every=args.local * args.eval_every,
                                             validate=lambda p: heldout_accuracy(cfg, p, n),
                                             device=torch.device("cpu"), log=False)
            per_client[pid] = {"what": src.what.split("(", 1)[-1].rstrip(")"), "classes": src.num_classes, "curve": curve}
            print("alone", pid, src.what, curve[-1], flush=True)
        rows = []
        for i, first in enumerate(per_client[chosen[0]]["curve"]):
            vals = [per_client[p]["curve"][i] for p in chosen]
            rows.append({"round": first["iteration"] // args.local,
                         "eval_accuracy_pre": sum(v["eval_accuracy_pre"] for v in vals) / len(vals),
                         "eval_accuracy_post": sum(v["eval_accuracy_post"] for v in vals) / len(vals),
                         **{f"post_client{p}": per_client[p]["curve"][i]["eval_accuracy_post"] for p in chosen}})
        write_csv(out / "curve_alone.csv", rows)
        summary["variants"]["alone"] = {
            "kind": "central MAML on one client's alphabet (no Flower)", "wall_seconds": time.perf_counter() - t0,
            "clients": {str(p): {"what": v["what"], "classes": v["classes"],
                                 "final_post": v["curve"][-1]["eval_accuracy_post"]} for p, v in per_client.items()}}
    for name in ("fedavg-global", "alone"):
        path = out / f"curve_{name}.csv"
        if path.exists():
            with path.open() as f:
                curves[name] = [{k: float(v) if k != "round" else int(v) for k, v in r.items() if v != ""}
                                for r in csv.DictReader(f)]

    summary["round0"] = round0
    summary["final"] = {name: c[-1]["eval_accuracy_post"] for name, c in curves.items()}
    summary["rounds_to_target"] = rounds_to_target(curves, summary["variants"], round0["eval_accuracy_post"])
    summary["total_wall_seconds"] = time.perf_counter() - t_all
    summary["load_average_end"] = os.getloadavg()
    all_rows = [{"variant": name, **r} for name, c in curves.items() for r in c]
    if all_rows:
        write_csv(out / "curves.csv", all_rows)
        plot(curves, out / "heldout_accuracy.png", args)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_md(summary, args))
    print((out / "summary.md").read_text())
    return summary


def tuned(cfg: Config, params: Params, val, n: int) -> dict:
    """Tune (lr, steps) on background episodes, then the held-out accuracy with them."""
    best = tune_finetuning(cfg, params, val)
    tuned_cfg = cfg.replace(inner_lr=best["inner_lr"], eval_steps=best["steps"])
    return {**best, **{f"heldout_{k}": v for k, v in heldout_accuracy(tuned_cfg, params, n).items()}}


def first_round(curve: list[dict], target: float) -> int | None:
    """The first round >= 1 whose accuracy reaches `target` (None: never)."""
    return next((r["round"] for r in curve if r["round"] >= 1 and r["eval_accuracy_post"] >= target), None)


def rounds_to_target(curves: dict[str, list[dict]], variants: dict, round0: float) -> list[dict]:
    """For each baseline final accuracy (default and tuned fine-tuning): rounds each variant needs.
    A target at or below the random initialisation's accuracy (`round0`) is flagged: it says the
    baseline learned nothing useful, not that the others communicate less."""
    out = []
    for base in ("fedavg", "fedavg-global"):
        if base not in curves:
            continue
        targets = {"final (3 steps, lr 0.4)": (curves[base][-1]["eval_accuracy_post"], first_round(curves[base], curves[base][-1]["eval_accuracy_post"]))}
        t = variants.get(base, {}).get("tuned")
        if t:
            targets[f"final, tuned fine-tuning ({t['steps']} steps, lr {t['inner_lr']})"] = (
                t["heldout_eval_accuracy_post"], None)
        for label, (target, base_rounds) in targets.items():
            for name in ("fedmeta", "dist-maml", "alone"):
                if name not in curves:
                    continue
                r = first_round(curves[name], target)
                base_r = base_rounds if base_rounds is not None else curves[base][-1]["round"]
                out.append({"baseline": base, "target": label, "target_accuracy": target, "variant": name,
                            "rounds": r, "baseline_rounds": base_r, "target_below_random_init": target <= round0,
                            "ratio": (base_r / r) if r else None})
    return out


def summary_md(summary: dict, args) -> str:
    c = summary["clients"]
    lines = ["# Federated few-shot Omniglot by alphabet", "",
             f"`{summary['command']}` (seed {summary['seed']}). {c['train']} training clients (one background "
             f"alphabet each), {c['heldout']} held-out clients (the 20 evaluation alphabets), fraction "
             f"{args.fraction} per round, {args.rounds} rounds, {args.local} local iterations of {args.batch} tasks; "
             f"held-out 5-way 1-shot accuracy after 3 steps (alpha 0.4) on {args.eval_tasks} fixed episodes per "
             "held-out client.", "",
             "| variant | final held-out accuracy | tuned fine-tuning (held-out) | wall time |", "|---|---|---|---|",
             f"| random init (round 0) | {100 * summary['round0']['eval_accuracy_post']:.1f} % | | |"]
    for name, acc in summary["final"].items():
        v = summary["variants"].get(name, {})
        t = v.get("tuned")
        tt = f"{100 * t['heldout_eval_accuracy_post']:.1f} % ({t['steps']} steps, lr {t['inner_lr']})" if t else ""
        lines.append(f"| {name} | {100 * acc:.1f} % | {tt} | {v.get('wall_seconds', 0) / 60:.1f} min |")
    if summary["rounds_to_target"]:
        lines += ["", "Rounds to reach a baseline's final accuracy (first evaluated round; every "
                  f"{args.eval_every} rounds):", "",
                  "| baseline | target | accuracy | variant | rounds | baseline rounds | ratio |",
                  "|---|---|---|---|---|---|---|"]
        if any(r["target_below_random_init"] for r in summary["rounds_to_target"]):
            lines[-3] += " `*`: the target is at or below the random initialisation's accuracy (no real target)."
        for r in summary["rounds_to_target"]:
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
            star = " *" if r["target_below_random_init"] else ""
            lines.append(f"| {r['baseline']} | {r['target']} | {100 * r['target_accuracy']:.1f} %{star} | {r['variant']} | "
                         f"{r['rounds'] if r['rounds'] is not None else 'not reached'} | {r['baseline_rounds']} | "
                         f"{ratio} |")
    if "alone" in summary["variants"]:
        lines += ["", "Clients alone: " + "; ".join(f"partition {p} ({v['what']}, {v['classes']} classes): "
                                                    f"{100 * v['final_post']:.1f} %"
                                                    for p, v in summary["variants"]["alone"]["clients"].items())]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot([r["round"] for r in c], [100 * r["eval_accuracy_post"] for r in c], marker=".", label=name)
    ax.set(xlabel="communication round", ylabel="held-out accuracy after 3 steps (%)",
           title=f"Omniglot 5-way 1-shot, 30 alphabet clients, fraction {args.fraction}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
