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
5. central:       no federation: central MAML on the union of the training clients' data (all 30
                  background alphabets with rotations, tasks drawn across alphabets), as many
                  meta-iterations of `--batch` tasks as the FedMeta federation runs in total (rounds x
                  sampled clients x local iterations: matched compute), Adam at meta-lr 1e-3, from the
                  same initialisation; evaluated like the federated variants (the held-out clients'
                  episodes, 3 steps alpha 0.4), every `--eval-every` rounds' worth of iterations.
6. fedmeta-*:     FedMeta (variant 1's local MAML and budget) with the composed fusion of the strategy
                  (`FUSED`: client meta-lr, server optimizer / rate / momentum, cosine schedules of the
                  client and server rates over the rounds).

Round 0 of every curve is the variant's random initialisation fine-tuned the same way. For the final
models of fedavg and fedavg-global the fine-tuning (step size, steps) is also tuned on episodes of
the background alphabets (never the held-out ones). Rounds to target: the first evaluated round at
which fedmeta / dist-maml / alone reach a baseline's final held-out accuracy, against the rounds that
baseline needed.

    python experiments/omniglot_federated.py --quick            # smoke run: 2 training clients, 2 rounds
    python experiments/omniglot_federated.py                    # the reference run (every variant)
    python experiments/omniglot_federated.py --only central     # one variant; the others' results are kept

Every variant's final meta-model is written to models/<variant>.pt (`fedmeta.load_meta_model`).
"""

from __future__ import annotations

import math
import os
import random
import shutil
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
from fedmeta.results import load_meta_model, save_meta_model, versions

DATA = REPO.parent / "shared" / "data" / "omniglot"
FLOWER = ("fedmeta", "dist-maml", "fedavg", "fedavg-global")
# FedMeta with the composed fusion (strategies/fusion.py): the same local MAML and total budget as "fedmeta"
# (rounds x sampled clients x local iterations), other client and server rates or another split of the budget
# (`rounds_x` multiplies the rounds, `local_x` the local iterations, `fraction_x` the fraction sampled).
# Server SGD at lr 1 is plain averaging; "cosine" anneals a rate from its base at round 1 to 0 at the last
# round (server_optimizers.py).
COSINE = {"client_lr_schedule": "cosine", "server_lr_schedule": "cosine"}
FUSED = {
    "fedmeta-lr10": {"meta_lr": 1e-2},  # 10x the clients' Adam rate
    "fedmeta-lr10-cos": {"meta_lr": 1e-2, **COSINE},  # ... annealed, with the server's averaging rate
    "fedmeta-lr3-cos": {"meta_lr": 3e-3, **COSINE},
    # FedAvgM (Hsu et al. 2019): server SGD with momentum 0.9 on the pseudo-gradient, 10x the steady-state step
    "fedmeta-avgm-cos": {"server_optimizer": "sgd", "server_lr": 1.0, "server_momentum": 0.9, **COSINE},
    "fedmeta-slr2": {"server_optimizer": "sgd", "server_lr": 2.0},  # twice the averaged step (extrapolation)
    "fedmeta-r2-l05": {"rounds_x": 2, "local_x": 0.5},  # 120 rounds of 5 local iterations: less client drift
    "fedmeta-r2-c05": {"rounds_x": 2, "fraction_x": 0.5},  # 120 rounds of 3 clients: twice the sequential depth
    "fedmeta-scaffold": {"drift_correction": "scaffold"},  # SCAFFOLD control variates against alphabet drift
    "fedmeta-r2-c05-scaffold": {"rounds_x": 2, "fraction_x": 0.5, "drift_correction": "scaffold"},
}
SPLIT = ("rounds_x", "local_x", "fraction_x")  # FUSED keys that re-split the budget (not Config fields)
FEDMETA_FAMILY = ("fedmeta", *FUSED)  # the "average"-fusion MAML federations the goal compares with central
VARIANTS = (*FLOWER, *FUSED, "central", "alone")
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
    """A Flower variant's config (FLOWER or FUSED); "central" and "alone" train with "fedmeta"'s."""
    if name in FUSED:
        fused = {k: v for k, v in FUSED[name].items() if k not in SPLIT}
        rounds = round(args.rounds * FUSED[name].get("rounds_x", 1))
        return base.replace(algorithm="maml", fusion="average", num_rounds=rounds, checkpoint_every=rounds,
                            local_iterations=max(1, round(args.local * FUSED[name].get("local_x", 1))),
                            fraction_train=args.fraction * FUSED[name].get("fraction_x", 1), **fused)
    changes = {"fedmeta": dict(algorithm="maml", fusion="average"),
               "dist-maml": dict(algorithm="maml", fusion="meta-gradient", local_iterations=args.grad_local,
                                 server_lr=args.server_lr),
               "fedavg": dict(algorithm="pretrain", fusion="average"),
               "fedavg-global": dict(algorithm="pretrain-global", fusion="average")}[name]
    return base.replace(**changes)


def sampled_per_round(args: Settings) -> int:
    """Training clients per round: the strategy's rule (strategies/sampling.py), max(min-train-nodes,
    ceil(fraction x training clients)), at most all of them."""
    return min(args.train_clients, max(2, math.ceil(args.fraction * args.train_clients)))


def matched_iterations(args: Settings) -> int:
    """The FedMeta federation's client meta-iterations of `--batch` tasks in total: rounds x sampled clients
    x local iterations (3600 = 60 x 6 x 10 by default), the central run's budget."""
    return args.rounds * sampled_per_round(args) * args.local


def budget(name: str, cfg: Config, rounds_csv: Path | None, args: Settings) -> dict:
    """What a variant computed: client (or central) meta-iterations and tasks per iteration; for Flower
    runs counted from the replies the strategy accepted (rounds.csv: num_replies)."""
    if rounds_csv is not None:
        replies = int(sum(r["num_replies"] for r in tables.read_csv(rounds_csv)))
        return {"client_replies": replies, "meta_iterations": replies * cfg.local_iterations,
                "tasks_per_iteration": cfg.meta_batch_size}
    if name == "central":
        return {"meta_iterations": matched_iterations(args), "tasks_per_iteration": cfg.meta_batch_size}
    return {"meta_iterations_per_client": args.rounds * args.local, "tasks_per_iteration": cfg.meta_batch_size}


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
    summary = {"command": command(args, only=None), "settings": settings(args),
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
    for name in (*FLOWER, *FUSED):
        if name not in want:
            continue
        cfg = variant_config(base, name, args)
        start = initial(cfg)
        fed = federation.run(cfg, name=name, results_dir=out / "runs", num_supernodes=n, replace=True)
        fed.load().rounds.to_csv(out / f"rounds_{name}.csv", index=False)  # runs/ is not committed
        (out / "models").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fed.run_dir / "model.pt", out / "models" / f"{name}.pt")
        summary["variants"][name] = {"kind": "flower", "command": command(args, only=(name,)), **fed.record(),
                                     "round0": start,
                                     "overrides_vs_fedmeta": FUSED.get(name, {}),
                                     "budget": budget(name, cfg, out / f"rounds_{name}.csv", args)}
        if name in BASELINES:
            summary["variants"][name]["tuned"] = tuned(in_process(cfg, args), fed.model().params, val, n)
    if "central" in want:
        summary["variants"]["central"] = {"command": command(args, only=("central",)), **central_matched(
            args, in_process(variant_config(base, "fedmeta", args), args), n, out)}
    if "alone" in want:
        summary["variants"]["alone"] = {"command": command(args, only=("alone",)), **alone(
            args, in_process(variant_config(base, "fedmeta", args), args), n, out)}
    curves = read_curves(out, summary["variants"], summary["round0"])
    summary["final"] = {name: c[-1]["eval_accuracy_post"] for name, c in curves.items()}
    summary["rounds_to_target"] = rounds_to_target(curves, summary["variants"], summary["round0"]["eval_accuracy_post"])
    summary["goal"] = goal(summary["final"])
    summary["fresh"] = fresh_check(args, in_process(variant_config(base, "fedmeta", args), args), n, out)
    if summary["goal"] and summary["fresh"]:
        summary["goal"]["fresh"] = fresh_goal(summary["goal"], summary["fresh"])
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


def central_matched(args: Settings, cfg: Config, n: int, out: Path) -> dict:
    """Central MAML on the union of the training clients' data for `matched_iterations` meta-iterations,
    its held-out accuracy every `--eval-every` rounds' worth of iterations (curve_central.csv, by round)."""
    per_round = sampled_per_round(args) * args.local  # meta-iterations one federated round runs in total
    union = partition.full_source(cfg.replace(omniglot_split="alphabet"))  # the 30 background alphabets
    t0 = time.perf_counter()
    trained = central.train(cfg, union, iterations=matched_iterations(args), eval_every=per_round * args.eval_every,
                            validate=lambda p: heldout_accuracy(cfg, p, n), log=True)
    rows = [{"round": r["iteration"] // per_round, "iteration": r["iteration"], "train_loss": r["train_loss"],
             "eval_accuracy_pre": r["eval_accuracy_pre"], "eval_accuracy_post": r["eval_accuracy_post"]}
            for r in trained.curve]
    tables.write_csv(out / "curve_central.csv", rows)
    save_meta_model(out / "models" / "central.pt", trained.params, cfg)
    return {"kind": "central MAML on the union of the training clients' alphabets (no Flower)",
            "source": union.what, "classes": union.num_classes, "wall_seconds": time.perf_counter() - t0,
            "timing": trained.timing, "budget": budget("central", cfg, None, args),
            "iterations_per_round": per_round}


GOAL_POINTS = 2.0  # the goal: federated within 2 points of central at matched meta-iterations


def judged(federated: float, central: float) -> dict:
    """The goal's verdict on two accuracies (fractions): the gap in points and whether it is within GOAL_POINTS."""
    gap = 100 * (central - federated)
    return {"federated": federated, "central": central, "gap_points": gap, "met": gap <= GOAL_POINTS}


FRESH_SEED_OFFSET = 1000  # the fresh check's episodes: seed + this (the held-out alphabets are the same)
FRESH_TASKS_X = 4  # ... and 4 x --eval-tasks of them per held-out client


def fresh_check(args: Settings, cfg: Config, n: int, out: Path) -> dict[str, float]:
    """The held-out accuracy of every FedMeta-family and central model in <out>/models on episodes none of them
    was chosen on: the same held-out alphabets, another seed, 4 x as many episodes. The curves' episodes are the
    ones the best variant is picked on, so its accuracy there is biased upwards; this one is not."""
    fresh = cfg.replace(seed=args.seed + FRESH_SEED_OFFSET, eval_tasks=FRESH_TASKS_X * args.eval_tasks)
    found = {}
    for name in (*FEDMETA_FAMILY, "central"):
        if (out / "models" / f"{name}.pt").exists():
            params = load_meta_model(out / "models" / f"{name}.pt").params
            found[name] = heldout_accuracy(fresh, params, n)["eval_accuracy_post"]
    return found


def fresh_goal(g: dict, fresh: dict[str, float]) -> dict | None:
    """The goal for the variant chosen on the curves' episodes, measured on the fresh ones."""
    if g["best_federated"] not in fresh or "central" not in fresh:
        return None
    return judged(fresh[g["best_federated"]], fresh["central"])


def goal(final: dict[str, float]) -> dict | None:
    """The issue's goal: the best FedMeta-family federation within 2 points of central at matched compute."""
    fed = {k: v for k, v in final.items() if k in FEDMETA_FAMILY}
    if "central" not in final or not fed:
        return None
    best = max(fed, key=fed.get)
    return {"best_federated": best, **judged(fed[best], final["central"])}


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
            "budget": budget("alone", cfg, None, args),
            "clients": {str(p): {"what": v["what"], "classes": v["classes"],
                                 "final_post": v["curve"][-1]["eval_accuracy_post"]} for p, v in per_client.items()}}


def read_curves(out: Path, variants: dict, round0: dict) -> dict[str, list[dict]]:
    """Each variant's held-out accuracy per evaluated round, from the files in `out` (this invocation's or an
    earlier one's): round 0 (its initialisation; `round0` where an earlier summary did not record it) then
    the Flower run's evaluated rounds, or the alone curve."""
    curves = {}
    for name in (*FLOWER, *FUSED):
        path = out / f"rounds_{name}.csv"
        if path.exists() and name in variants:
            rounds = [r for r in tables.read_csv(path) if r["eval_accuracy_post"] == r["eval_accuracy_post"]]
            curves[name] = [variants[name].get("round0", round0)] + [
                {"round": int(r["round"]), **{k: r[k] for k in ("train_loss", "eval_accuracy_pre",
                                                                "eval_accuracy_post")}} for r in rounds]
    for name in ("central", "alone"):
        if (out / f"curve_{name}.csv").exists() and name in variants:
            curves[name] = [{k: (int(v) if k in ("round", "iteration") else v) for k, v in r.items() if v == v}
                            for r in tables.read_csv(out / f"curve_{name}.csv")]
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
            for name in (*FEDMETA_FAMILY, "dist-maml", "central", "alone"):
                if name not in curves:
                    continue
                r = first_round(curves[name], target)
                base_r = base_rounds if base_rounds is not None else curves[base][-1]["round"]
                out.append({"baseline": base, "target": label, "target_accuracy": target, "variant": name,
                            "rounds": r, "baseline_rounds": base_r,
                            "target_below_random_init": target <= round0,
                            "ratio": (base_r / r) if r else None})
    return out


def describe(name: str) -> str:
    """A variant in a few words (its fusion overrides for the FedMeta family)."""
    if name in FUSED:
        return "FedMeta, " + ", ".join(f"{k.replace('_', '-')} {x}" for k, x in FUSED[name].items())
    return {"fedmeta": "FedMeta (MAML, averaged)", "dist-maml": "meta-gradient fusion, server Adam",
            "fedavg": "FedAvg, episode labels", "fedavg-global": "FedAvg, global classes (pretrain-global)",
            "central": "central MAML, union of the clients' data", "alone": "each client alone (mean)"}.get(name, "")


def budget_text(b: dict | None) -> str:
    if not b:
        return ""
    if "meta_iterations" in b:
        return f"{b['meta_iterations']} x {b['tasks_per_iteration']}"
    return f"{b['meta_iterations_per_client']} x {b['tasks_per_iteration']} per client"


def summary_md(summary: dict, args: Settings) -> list[str]:
    c = summary["clients"]
    lines = ["# Federated few-shot Omniglot by alphabet", "",
             f"`{summary['command']}` (seed {summary['seed']}). {c['train']} training clients (the 30 background "
             f"alphabets), {c['heldout']} held-out clients (the 20 evaluation alphabets), fraction "
             f"{args.fraction} per round, {args.rounds} rounds, {args.local} local iterations of {args.batch} tasks; "
             f"held-out 5-way 1-shot accuracy after 3 steps (alpha 0.4) on {args.eval_tasks} fixed episodes per "
             "held-out client.", ""]
    body = [["random init (round 0)", "", f"{100 * summary['round0']['eval_accuracy_post']:.1f} %", "", "", ""]]
    for name, acc in summary["final"].items():
        v = summary["variants"].get(name, {})
        t = v.get("tuned")
        tt = f"{100 * t['heldout_eval_accuracy_post']:.1f} % ({t['steps']} steps, lr {t['inner_lr']})" if t else ""
        body.append([name, describe(name), f"{100 * acc:.1f} %", tt, budget_text(v.get("budget")),
                     f"{v.get('wall_seconds', 0) / 60:.1f} min"])
    lines += tables.markdown_table(["variant", "what", "final held-out accuracy", "tuned fine-tuning (held-out)",
                                    "meta-iterations x tasks", "wall time"], body)
    g = summary.get("goal")
    if g:
        lines += ["", (f"Goal (FedMeta within 2 points of central MAML at matched meta-iterations): best FedMeta "
                       f"variant {g['best_federated']} {100 * g['federated']:.1f} % vs central "
                       f"{100 * g['central']:.1f} %: {g['gap_points']:.1f} points behind, "
                       f"**{'met' if g['met'] else 'not met'}**.")]
        if f := g.get("fresh"):
            lines += ["", (f"The variant was chosen on those episodes; on {FRESH_TASKS_X * args.eval_tasks} fresh "
                           f"episodes per held-out client (seed {summary['seed'] + FRESH_SEED_OFFSET}, the same "
                           f"alphabets): {g['best_federated']} {100 * f['federated']:.1f} % vs central "
                           f"{100 * f['central']:.1f} %: {f['gap_points']:.1f} points behind, "
                           f"**{'met' if f['met'] else 'not met'}**. Every model on them: "
                           + ", ".join(f"{k} {100 * v:.1f} %" for k, v in summary["fresh"].items()) + ".")]
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
    lines += ["", "Each variant alone (same numbers; `models/<variant>.pt` is its final meta-model):", ""]
    lines += [f"- {name}: `{v['command']}`" for name, v in summary["variants"].items() if "command" in v]
    if "alone" in summary["variants"]:
        lines += ["", "Clients alone: " + "; ".join(f"partition {p} ({v['what']}, {v['classes']} classes): "
                                                    f"{100 * v['final_post']:.1f} %"
                                                    for p, v in summary["variants"]["alone"]["clients"].items())]
    return lines


if __name__ == "__main__":
    main()
