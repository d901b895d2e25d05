"""Few-shot Omniglot federated by alphabet: FedMeta (Chen et al. 2018, "Federated Meta-Learning
with Fast Convergence and Efficient Communication") against FedAvg (McMahan et al. 2017) and
against every client alone.

Clients: the 30 background alphabets are 30 training clients (one alphabet each, with rotations as
extra classes; `--train-clients` fewer: contiguous groups of alphabets); `--heldout` more clients own
the 20 evaluation alphabets (4 each for 5) and never
train: every `--eval-every` rounds they adapt the global model to their fixed 5-way 1-shot episodes
(1 support + 1 query image per class, 3 steps of alpha = 0.4) and report the accuracy
(`rounds.csv`: eval_accuracy_post). A fraction `--fraction` of the training clients is sampled per
round (the strategy's sampling rule). Variants, all real Flower simulations with the same number of rounds:

1. fedmeta:       MAML (second order, 1 inner step alpha = 0.4), `--local` local meta-iterations of
                  `--batch` tasks, meta-models averaged (fusion = "average");
2. dist-maml:     MAML meta-gradients at the global model (`--grad-local` meta-batches each) averaged,
                  one server Adam step per round (fusion = "meta-gradient", server-lr);
3. fedavg:        `algorithm = pretrain`: a conv4 classifier trained on the episodes' labels, FedAvg,
                  then fine-tuned on each held-out support set. NOTE: the labels of an episode are its
                  classes' random positions 0..4, so this classifier has no consistent target (its optimum
                  is the uniform prediction) and the variant is close to fine-tuning a random init;
3b. fedavg-global: `algorithm = pretrain-global`: the meaningful FedAvg baseline, a conv4 with one output
                  per training class (every character x rotation of the 30 background alphabets), FedAvg;
                  at test the head is replaced by a zero 5-way head and the whole network fine-tuned on
                  the support set (Chen et al. 2019, "A Closer Look at Few-shot Classification", "Baseline").
4. alone:         no federation: `--alone` training clients (seeded choice) each run central MAML on
                  their own alphabet only, `--rounds x --local` meta-iterations (as if sampled every
                  round), evaluated on the held-out clients' episodes on the same schedule; mean of them.

Round 0 of every curve is the variant's random initialisation fine-tuned the same way. For the final
models of fedavg and fedavg-global the fine-tuning (step size, steps) is also tuned on episodes of
the background alphabets (never the held-out ones). Rounds to target: the first evaluated round at
which fedmeta / dist-maml / alone reach a baseline's final held-out accuracy, against the rounds that
baseline needed.

    python experiments/omniglot_federated.py --quick            # smoke run: 2 training clients, 2 rounds
    python experiments/omniglot_federated.py                    # the reference run
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from fedmeta import algorithms, local, partition, seeding
from fedmeta.config import Config
from fedmeta.lab import central, federation, tables
from fedmeta.lab.args import REPO, Args, arg, command, parse, settings
from fedmeta.lab.protocol import tune_finetuning
from fedmeta.optim import Params
from fedmeta.results import versions

DATA = REPO.parent / "shared" / "data" / "omniglot"
FLOWER = ("fedmeta", "dist-maml", "fedavg", "fedavg-global")
VARIANTS = (*FLOWER, "alone")
BASELINES = ("fedavg", "fedavg-global")  # FedAvg models: their fine-tuning is tuned too
TUNE_LR = (0.01, 0.04, 0.1, 0.4, 1.0)  # fine-tuning step sizes tried for the FedAvg models
TUNE_STEPS = (1, 3, 5, 10)


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/omniglot_federated.py"
    NAME: ClassVar[str] = "omniglot_federated"
    QUICK: ClassVar[dict] = {"train_clients": 2, "heldout": 1, "fraction": 1.0, "rounds": 2, "local": 2, "batch": 2,
                             "eval_tasks": 4, "eval_every": 1, "alone": 1, "val_tasks": 10, "compile": False}

    rounds: int = arg(60, "communication rounds of every variant")
    local: int = arg(10, "local iterations (fedmeta, fedavg, fedavg-global, alone)")
    grad_local: int = arg(1, "meta-batches per dist-maml meta-gradient")
    server_lr: float = arg(0.003, "dist-maml server Adam step")
    batch: int = arg(8, "tasks per local iteration")
    train_clients: int = arg(30, "training clients (30: one background alphabet each)")
    fraction: float = arg(0.2, "fraction of the training clients sampled per round")
    heldout: int = arg(5, "held-out clients (the 20 evaluation alphabets)")
    eval_tasks: int = arg(100, "episodes per held-out client")
    eval_every: int = arg(4, "rounds between held-out evaluations")
    alone: int = arg(3, "training clients that also train alone")
    val_tasks: int = arg(300, "background episodes to tune the FedAvg models' fine-tuning")
    only: tuple[str, ...] | None = arg(None, "run only these variants (the others' results in --out are kept)",
                                       choices=VARIANTS)
    threads: int = arg(2, "torch threads of the in-process parts (alone, evaluation)")
    seed: int = arg(0, "run seed")
    compile: bool = arg(False, "torch.compile the clients' meta-gradients")
    data_dir: Path = arg(DATA, "Omniglot arrays (fedmeta.tasks.omniglot_io)")


def base_config(args: Settings) -> Config:
    """The federations' shared config (the app's defaults with these changes)."""
    return federation.app_config(
        task="omniglot", data_dir=str(Path(args.data_dir).resolve()), ways=5, shots=1, query_shots=1, inner_steps=1,
        inner_lr=0.4, meta_lr=1e-3, meta_batch_size=args.batch, eval_shots=1, eval_query_shots=1, eval_steps=3,
        eval_tasks=args.eval_tasks, heldout_partitions=args.heldout, fraction_train=args.fraction, min_train_nodes=2,
        num_rounds=args.rounds, eval_every=args.eval_every, checkpoint_every=args.rounds, seed=args.seed,
        compile=args.compile, omniglot_split="character", omniglot_rotations=True, local_iterations=args.local)


def in_process(cfg: Config, args: Settings) -> Config:
    """The config of this process's own work (evaluations, the alone clients): eager, `--threads` threads
    (fedmeta.local sets torch's threads from the config)."""
    return cfg.replace(threads=args.threads, compile=False)


def variant_config(base: Config, name: str, args: Settings) -> Config:
    changes = {"fedmeta": dict(algorithm="maml", fusion="average"),
               "dist-maml": dict(algorithm="maml", fusion="meta-gradient", local_iterations=args.grad_local,
                                 server_lr=args.server_lr),
               "fedavg": dict(algorithm="pretrain", fusion="average"),
               "fedavg-global": dict(algorithm="pretrain-global", fusion="average")}[name]
    return base.replace(**changes)


def heldout_accuracy(cfg: Config, params: Params, num_partitions: int) -> dict:
    """Task-weighted mean over the held-out clients of their accuracy before/after cfg.eval_steps, exactly as
    the held-out clients compute it (fedmeta.local.evaluate)."""
    total, pre, post = 0, 0.0, 0.0
    for pid in range(num_partitions - cfg.heldout_partitions, num_partitions):
        r = local.evaluate(local.client(cfg, pid, num_partitions), params)
        total += r.num_tasks
        pre += r.num_tasks * r.accuracy_pre
        post += r.num_tasks * r.accuracy_post
    return {"eval_accuracy_pre": pre / total, "eval_accuracy_post": post / total}


def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    seeding.seed_everything(args.seed)
    out, t_all, n = args.out_dir, time.perf_counter(), args.train_clients + args.heldout
    base = base_config(args)
    want = set(VARIANTS if args.only is None else args.only)
    summary = {"command": command(args), "settings": settings(args),
               "clients": {"train": args.train_clients, "heldout": args.heldout, "num_supernodes": n},
               "seed": args.seed, "machine": tables.machine(), "versions": versions(), "variants": {},
               "load_average_start": os.getloadavg()}
    if (out / "summary.json").exists():  # keep the variants of an earlier invocation (--only runs some)
        summary["variants"] = tables.read_json(out / "summary.json").get("variants", {})
    # validation episodes for tuning the FedAvg fine-tuning: background alphabets, no rotations
    val = partition.full_source(base.replace(omniglot_split="alphabet", omniglot_rotations=False)).sample(
        args.val_tasks, 1, 1, seeding.generator(args.seed, "fedavg-validation"))
    round0: dict[str, dict] = {}  # per algorithm: its initialisation (the ServerApp's initial model), adapted

    def initial(cfg: Config) -> dict:
        if cfg.algorithm not in round0:
            init = algorithms.build(cfg).init(seeding.generator(cfg.seed, "init"))
            round0[cfg.algorithm] = {"round": 0, **heldout_accuracy(in_process(cfg, args), init, n)}
        return round0[cfg.algorithm]

    summary["round0"] = initial(variant_config(base, "fedmeta", args))  # the common conv4 initialisation
    for name in FLOWER:
        if name not in want:
            continue
        cfg = variant_config(base, name, args)
        start = initial(cfg)
        fed = federation.run(cfg, name=name, results_dir=out / "runs", num_supernodes=n, replace=True)
        summary["variants"][name] = {"kind": "flower", **fed.record(), "round0": start}
        fed.load().rounds.to_csv(out / f"rounds_{name}.csv", index=False)  # runs/ is not committed
        if name in BASELINES:
            summary["variants"][name]["tuned"] = tuned(in_process(cfg, args), fed.model().params, val, n)
    if "alone" in want:
        summary["variants"]["alone"] = alone(args, in_process(variant_config(base, "fedmeta", args), args), n, out)
    curves = read_curves(out, summary["variants"], summary["round0"])
    summary["final"] = {name: c[-1]["eval_accuracy_post"] for name, c in curves.items()}
    summary["rounds_to_target"] = rounds_to_target(curves, summary["variants"], summary["round0"]["eval_accuracy_post"])
    summary["total_wall_seconds"] = time.perf_counter() - t_all
    summary["load_average_end"] = os.getloadavg()
    all_rows = [{"variant": name, **r} for name, c in curves.items() for r in c]
    if all_rows:
        tables.write_csv(out / "curves.csv", all_rows)
        tables.plot(out / "heldout_accuracy.png", [
            tables.Line(name, [r["round"] for r in c], [100 * r["eval_accuracy_post"] for r in c], marker=".")
            for name, c in curves.items()], xlabel="communication round", grid=True,
            ylabel="held-out accuracy after 3 steps (%)",
            title=f"Omniglot 5-way 1-shot, {args.train_clients} alphabet clients, fraction {args.fraction}")
    tables.write_json(out / "summary.json", summary)
    tables.write_text(out / "summary.md", summary_md(summary, args))
    print((out / "summary.md").read_text())
    return summary


def tuned(cfg: Config, params: Params, val, n: int) -> dict:
    """Tune (lr, steps) on background episodes, then the held-out accuracy with them."""
    best = tune_finetuning(cfg, params, val, TUNE_LR, TUNE_STEPS)
    tuned_cfg = cfg.replace(inner_lr=best["inner_lr"], eval_steps=best["steps"])
    return {**best, **{f"heldout_{k}": v for k, v in heldout_accuracy(tuned_cfg, params, n).items()}}


def alone(args: Settings, cfg: Config, n: int, out: Path) -> dict:
    """Central MAML on each of `args.alone` seeded training clients' own alphabet; their mean curve."""
    rng = random.Random(seeding.derive(args.seed, "alone-clients"))
    chosen = sorted(rng.sample(range(args.train_clients), args.alone))
    per_client, t0 = {}, time.perf_counter()
    for pid in chosen:
        src = partition.task_source(cfg, pid, n)
        trained = central.train(cfg, src, iterations=args.rounds * args.local, eval_every=args.local * args.eval_every,
                                validate=lambda p: heldout_accuracy(cfg, p, n), log=False)
        per_client[pid] = {"what": src.what.split("(", 1)[-1].rstrip(")"), "classes": src.num_classes,
                           "curve": trained.curve}
        print("alone", pid, src.what, trained.curve[-1], flush=True)
    rows = []
    for i, first in enumerate(per_client[chosen[0]]["curve"]):
        vals = [per_client[p]["curve"][i] for p in chosen]
        rows.append({"round": first["iteration"] // args.local,
                     "eval_accuracy_pre": sum(v["eval_accuracy_pre"] for v in vals) / len(vals),
                     "eval_accuracy_post": sum(v["eval_accuracy_post"] for v in vals) / len(vals),
                     **{f"post_client{p}": per_client[p]["curve"][i]["eval_accuracy_post"] for p in chosen}})
    tables.write_csv(out / "curve_alone.csv", rows)
    return {"kind": "central MAML on one client's alphabet (no Flower)", "wall_seconds": time.perf_counter() - t0,
            "clients": {str(p): {"what": v["what"], "classes": v["classes"],
                                 "final_post": v["curve"][-1]["eval_accuracy_post"]} for p, v in per_client.items()}}


def read_curves(out: Path, variants: dict, round0: dict) -> dict[str, list[dict]]:
    """Each variant's held-out accuracy per evaluated round, from the files in `out` (this invocation's or an
    earlier one's): round 0 (its initialisation; `round0` where an earlier summary did not record it) then
    the Flower run's evaluated rounds, or the alone curve."""
    curves = {}
    for name in FLOWER:
        path = out / f"rounds_{name}.csv"
        if path.exists() and name in variants:
            rounds = [r for r in tables.read_csv(path) if r["eval_accuracy_post"] == r["eval_accuracy_post"]]
            curves[name] = [variants[name].get("round0", round0)] + [
                {"round": int(r["round"]), **{k: r[k] for k in ("train_loss", "eval_accuracy_pre",
                                                                "eval_accuracy_post")}} for r in rounds]
    if (out / "curve_alone.csv").exists():
        curves["alone"] = [{k: (int(v) if k == "round" else v) for k, v in r.items() if v == v}
                           for r in tables.read_csv(out / "curve_alone.csv")]
    return curves


def first_round(curve: list[dict], target: float) -> int | None:
    """The first round >= 1 whose accuracy reaches `target` (None: never)."""
    return next((r["round"] for r in curve if r["round"] >= 1 and r["eval_accuracy_post"] >= target), None)


def rounds_to_target(curves: dict[str, list[dict]], variants: dict, round0: float) -> list[dict]:
    """For each baseline final accuracy (default and tuned fine-tuning): the rounds each variant needs.
    A target at or below the random initialisation's accuracy (`round0`) is flagged: it says the baseline
    learned nothing useful, not that the others communicate less."""
    out = []
    for base in BASELINES:
        if base not in curves:
            continue
        final = curves[base][-1]["eval_accuracy_post"]
        targets = {"final (3 steps, lr 0.4)": (final, first_round(curves[base], final))}
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
                            "rounds": r, "baseline_rounds": base_r,
                            "target_below_random_init": target <= round0,
                            "ratio": (base_r / r) if r else None})
    return out


def summary_md(summary: dict, args: Settings) -> list[str]:
    c = summary["clients"]
    lines = ["# Federated few-shot Omniglot by alphabet", "",
             f"`{summary['command']}` (seed {summary['seed']}). {c['train']} training clients (the 30 background "
             f"alphabets), {c['heldout']} held-out clients (the 20 evaluation alphabets), fraction "
             f"{args.fraction} per round, {args.rounds} rounds, {args.local} local iterations of {args.batch} tasks; "
             f"held-out 5-way 1-shot accuracy after 3 steps (alpha 0.4) on {args.eval_tasks} fixed episodes per "
             "held-out client.", ""]
    body = [["random init (round 0)", f"{100 * summary['round0']['eval_accuracy_post']:.1f} %", "", ""]]
    for name, acc in summary["final"].items():
        v = summary["variants"].get(name, {})
        t = v.get("tuned")
        tt = f"{100 * t['heldout_eval_accuracy_post']:.1f} % ({t['steps']} steps, lr {t['inner_lr']})" if t else ""
        body.append([name, f"{100 * acc:.1f} %", tt, f"{v.get('wall_seconds', 0) / 60:.1f} min"])
    lines += tables.markdown_table(["variant", "final held-out accuracy", "tuned fine-tuning (held-out)",
                                    "wall time"], body)
    if summary["rounds_to_target"]:
        lines += ["", f"Rounds to reach a baseline's final accuracy (first evaluated round; every {args.eval_every} "
                  "rounds):", ""]
        lines += tables.markdown_table(
            ["baseline", "target", "accuracy", "variant", "rounds", "baseline rounds", "ratio"],
            [[r["baseline"], r["target"], f"{100 * r['target_accuracy']:.1f} %"
              + (" *" if r["target_below_random_init"] else ""), r["variant"],
              "not reached" if r["rounds"] is None else r["rounds"], r["baseline_rounds"],
              f"{r['ratio']:.2f}x" if r["ratio"] else "-"] for r in summary["rounds_to_target"]])
        if any(r["target_below_random_init"] for r in summary["rounds_to_target"]):
            lines += ["", "`*`: the target is at or below the random initialisation's accuracy (no real target)."]
    if "alone" in summary["variants"]:
        lines += ["", "Clients alone: " + "; ".join(f"partition {p} ({v['what']}, {v['classes']} classes): "
                                                    f"{100 * v['final_post']:.1f} %"
                                                    for p, v in summary["variants"]["alone"]["clients"].items())]
    return lines


if __name__ == "__main__":
    main()
