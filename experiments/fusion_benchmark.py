"""Fusion benchmark on sinusoid (issue 11): every fusion at matched compute against central MAML, and a
Byzantine table. 10 non-IID clients (amplitude slices; 8 train, 2 held out), each federation a real Flower
simulation; every model scored by the library's protocol (fedmeta.lab.protocol): 600 fresh tasks of the whole
family, 5-shot, 100 query points, plain SGD at the trained inner rate, MSE after 1 / 5 / 10 steps.

Matched compute: rounds x local meta-iterations x 8 training clients = 70 000 client meta-iterations of 25 tasks
(350 x 25 x 8 in "average" fusion, 8750 x 1 x 8 for distributed MAML), as central MAML's 70 000 meta-iterations
(results/sinusoid_central/maml.pt). Rates that a fusion family tunes (server optimizers, FedAvgM, FedMeta's own
settings) are chosen on 600 validation tasks (another seed), never on the test tasks; every candidate is listed.

Byzantine table (a smaller budget, the same for every row): of the 8 training clients, 2 send sign-flipped x10
updates and 1 other claims 100 x its weight (clients/attacks.py), for each aggregator and weight policy, against
the honest run; these federations run through `flwr.simulation.run_simulation` with the attacking ClientApp.

    python experiments/fusion_benchmark.py --only fedmeta-tuned      # one federation; finished ones are reused
    python experiments/fusion_benchmark.py --quick                     # smoke run (3 small federations)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from clients.attacks import Attack
from fedmeta import partition
from fedmeta.config import Config
from fedmeta.lab import federation, tables
from fedmeta.lab.args import REPO, Args, arg, command, parse, settings
from fedmeta.lab.central import train as train_centrally
from fedmeta.lab.protocol import SEED_OFFSETS, evaluate_protocol, tune_inner_lr
from fedmeta.results import load_checkpoint, load_meta_model, save_meta_model

TRAIN_CLIENTS = 8  # of 10: the last 2 partitions are held out
CENTRAL = REPO / "results" / "sinusoid_central"  # experiments/sinusoid_central.py: maml.pt, summary.json
FINETUNE_LR = (0.001, 0.003, 0.01, 0.03)  # FedAvg's fine-tuning rates, as experiments/sinusoid_federated.py
STEPS = (0, 1, 5, 10)
TASK_SEED = 0  # the protocol's task sets: seed 0 + SEED_OFFSETS (central MAML's run seed)
# FedMeta's tuned settings: the clients' Adam at 10 x the default rate, it and the server's rate cosine-annealed to
# 1 % (a factor 0 in the last round makes every client's Adam refuse lr 0: that round would fail)
TUNED = {"meta_lr": 0.01, "client_lr_schedule": "cosine", "server_lr_schedule": "cosine", "schedule_min_factor": 0.01}
SCAFFOLD = {**TUNED, "drift_correction": "scaffold"}  # the same, each local meta-gradient drift-corrected
ROBUST = {"median": {"aggregator": "median"},
          "trimmed-mean": {"aggregator": "trimmed-mean", "trim_fraction": 0.25},  # drops 2 of 8 at each end
          "clipped-mean": {"aggregator": "clipped-mean", "clip_multiple": 2.0},
          "krum": {"aggregator": "krum", "krum_byzantine": 2, "krum_select": 0}}  # f = 2: multi-Krum of 6
AGGREGATORS = {"mean": {"aggregator": "mean"}, **ROBUST}
POLICIES = ("claimed", "equal", "capped")  # capped: weight-cap 3 x the round's median claim
SEEDS = (1, 2)  # the seed-spread table's other seeds
# the seed-spread table's federations: its column -> the seed-0 run (its seed-N runs are "<run>-seed-N")
SEED_ROWS = {"FedMeta tuned": "fedmeta-tuned", "FedMeta + SCAFFOLD": "fedmeta-scaffold",
             "FedMeta + SCAFFOLD, 10 local": "fedmeta-scaffold-local-10"}
MAIN = ("average", "meta-gradient", "baseline")  # the families of the main table (the others have tables of their own)
ATTACK = Attack(flip=(0, 1), scale=10.0, inflate=(2,), factor=100.0)  # partition 2: amplitudes 4.51-5.0


@dataclass(frozen=True)
class Variant:
    """One federation of the benchmark: its table group, fusion family, Config changes and attack."""

    name: str
    group: str  # the main table's row: the group's candidate best on validation tasks
    family: str  # "average" | "meta-gradient" | "baseline" | "byzantine" | "seed" | "diagnostic" (federated);
    # "central" (in-process)
    changes: dict = field(default_factory=dict)
    attack: Attack | None = None  # Byzantine rows: run with clients/attacks.py's ClientApp
    local: int | None = None  # local meta-iterations per round, if not --local ("average": rounds scale to match)
    clients: int = TRAIN_CLIENTS  # training clients sampled per round (fewer: more rounds, the same compute)

    @property
    def fraction(self) -> float:
        return self.clients / TRAIN_CLIENTS


def _variants() -> dict[str, Variant]:
    v = [Variant("fedmeta-plain", "FedMeta, defaults", "average"),
         Variant("fedmeta-tuned", "FedMeta, tuned", "average", TUNED),
         Variant("fedmeta-meta-lr-0.003", "FedMeta, tuned", "average", {"meta_lr": 0.003}),
         Variant("fedmeta-client-cosine", "FedMeta, tuned", "average",
                 {"meta_lr": 0.01, "client_lr_schedule": "cosine", "schedule_min_factor": 0.01}),
         Variant("fedmeta-fresh-adam", "FedMeta, tuned", "average", {**TUNED, "keep_optimizer_state": False}),
         Variant("fedmeta-local-5", "FedMeta, tuned", "average", {**TUNED, "meta_lr": 0.005}, local=5),
         Variant("fedmeta-local-1", "FedMeta, tuned", "average", {**TUNED, "meta_lr": 0.003}, local=1),
         Variant("fedmeta-lr-0.005-cos", "FedMeta, tuned", "average", {**TUNED, "meta_lr": 0.005}),
         Variant("fedmeta-lr-0.02-cos", "FedMeta, tuned", "average", {**TUNED, "meta_lr": 0.02}),
         Variant("fedmeta-local-10", "FedMeta, tuned", "average", TUNED, local=10),
         # fewer clients per round, proportionally more rounds: more sequential meta-steps at the same compute
         Variant("fedmeta-clients-4", "FedMeta, tuned", "average", {**TUNED, "fraction_train": 0.5}, clients=4),
         Variant("fedmeta-clients-2", "FedMeta, tuned", "average", {**TUNED, "fraction_train": 0.25}, clients=2),
         Variant("fedmeta-scaffold", "FedMeta + SCAFFOLD", "average", SCAFFOLD),
         Variant("fedmeta-scaffold-lr-0.005", "FedMeta + SCAFFOLD", "average", {**SCAFFOLD, "meta_lr": 0.005}),
         Variant("fedmeta-scaffold-local-10", "FedMeta + SCAFFOLD", "average", SCAFFOLD, local=10)]
    # the seed-spread table: SEED_ROWS's federations and central MAML, each trained again with other seeds and
    # scored on the same test tasks (seed 0 of each is the main table's run and maml.pt)
    base = {x.name: x for x in v}
    for seed in SEEDS:
        v += [Variant(f"{n}-seed-{seed}", "seed spread", "seed", {**base[n].changes, "seed": seed}, local=base[n].local,
                      clients=base[n].clients) for n in SEED_ROWS.values()]
        v.append(Variant(f"central-seed-{seed}", "seed spread", "central", {"seed": seed}))
    v += [Variant(f"fedavgm-{m}-{lr}", "FedAvgM (server momentum)", "average",
                  {**TUNED, "server_momentum": m, "server_lr": lr}) for m, lr in ((0.5, 0.5), (0.9, 0.1), (0.9, 0.2))]
    for opt, lrs in (("adam", (0.01, 0.03, 0.1)), ("yogi", (0.01, 0.03, 0.1)), ("adagrad", (0.03, 0.1, 0.3))):
        v += [Variant(f"server-{opt}-{lr}", f"server {opt.capitalize()}", "average",
                      {**TUNED, "server_optimizer": opt, "server_lr": lr}) for lr in lrs]
    v += [Variant(a, f"{a} (robust)", "average", {**TUNED, **c}) for a, c in ROBUST.items()]
    v += [Variant("distributed-maml", "distributed MAML", "meta-gradient",
                  {"fusion": "meta-gradient", "server_lr": 0.003}),
          Variant("distributed-maml-cosine", "distributed MAML", "meta-gradient",
                  {"fusion": "meta-gradient", "server_lr": 0.003,
                   "server_lr_schedule": "cosine", "schedule_min_factor": 0.01}),
          Variant("fedavg", "FedAvg + fine-tuning", "baseline", {"algorithm": "pretrain"}),
          # what the non-IID slices cost: the tuned settings with every client drawing from the whole family
          Variant("fedmeta-iid", "IID clients", "diagnostic", {**TUNED, "partition": "iid"})]
    for a, c in AGGREGATORS.items():
        v.append(Variant(f"byz-{a}-honest", a, "byzantine", {**TUNED, **c}, Attack()))
        v += [Variant(f"byz-{a}-{p}", a, "byzantine", {**TUNED, **c, "weight_policy": p}, ATTACK) for p in POLICIES]
    return {x.name: x for x in v}


VARIANTS = _variants()


@dataclass(frozen=True)
class Settings(Args):
    SCRIPT: ClassVar[str] = "experiments/fusion_benchmark.py"
    NAME: ClassVar[str] = "fusion_benchmark"
    QUICK: ClassVar[dict] = {"rounds": 2, "local": 2, "grad_rounds": 4, "byz_rounds": 2, "curve_points": 2,
                             "central_iterations": 20, "compile_central": False,
                             "only": ("fedavg", "fedmeta-tuned", "byz-trimmed-mean-claimed", "central-seed-1")}

    rounds: int = arg(350, "rounds of the 'average'-fusion federations and FedAvg")
    local: int = arg(25, "local meta-iterations per round ('average' fusion, FedAvg)")
    grad_rounds: int = arg(8750, "rounds of distributed MAML (1 averaged meta-gradient per client and round)")
    byz_rounds: int = arg(100, "rounds of the Byzantine table's federations (x --local meta-iterations)")
    central_iterations: int = arg(70_000, "meta-iterations of the seed table's central MAML runs (maml.pt's 70 000)")
    compile_central: bool = arg(True, "torch.compile those runs' meta-gradient (as maml.pt was trained)")
    checkpoint_its: int = arg(200, "client meta-iterations between checkpoints (the rounds-to-reach resolution)")
    curve_points: int = arg(35, "checkpoints of each run scored for the curve (more are scored to find the "
                                "first round that reaches FedAvg's final MSE)")
    only: tuple[str, ...] | None = arg(None, "run only these federations; finished ones in --out are reused for the "
                                             "tables", choices=tuple(VARIANTS))


# --- running ---------------------------------------------------------------------------------------------------
def rounds_and_local(v: Variant, args: Settings) -> tuple[int, int]:
    """(rounds, local meta-iterations) of a variant: the same client meta-iterations for every main-table row
    (rounds x local x sampled clients)."""
    if v.family == "meta-gradient":
        return args.grad_rounds, 1
    if v.family == "byzantine":
        return args.byz_rounds, args.local
    local = args.local if v.local is None else v.local
    return args.rounds * args.local * TRAIN_CLIENTS // (local * v.clients), local


def config(v: Variant, args: Settings) -> Config:
    rounds, local = rounds_and_local(v, args)
    every = max(1, round(args.checkpoint_its / (local * v.clients)))
    ckpt = rounds if v.family == "byzantine" else every  # the Byzantine table needs the final model only
    return federation.app_config(num_rounds=rounds, local_iterations=local, eval_every=max(1, rounds // 10),
                                 checkpoint_every=ckpt, **v.changes)


def simulate(cfg: Config, attack: Attack, runs: Path, name: str) -> dict:
    """A Byzantine-table federation in this process: the strategy's ServerApp and the attacking ClientApp on
    the Simulation Engine (Ray), 10 virtual clients, 1 CPU each, 2 at a time."""
    from flwr.simulation import run_simulation

    from clients.attacks import attack_app
    from strategies.server_app import server_app

    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    run_simulation(server_app=server_app(cfg.replace(results_dir=str(runs.resolve()), run_name=name)),
                   client_app=attack_app(attack), num_supernodes=TRAIN_CLIENTS + 2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    wall = time.perf_counter() - t0
    status = json.loads((run_dir / "status.json").read_text())
    if status["status"] not in ("completed", "completed-with-failures"):
        raise RuntimeError(f"federation {name!r} did not complete: {status}")
    return {"overrides": federation.run_config(cfg), "attack": vars(attack), "wall_seconds": wall,
            "status": status["status"]}


def run(v: Variant, args: Settings, runs: Path) -> dict:
    if v.family == "central":
        return train_central(v, args, runs)
    cfg = config(v, args)
    if v.attack is not None:
        return simulate(cfg, v.attack, runs, v.name)
    return federation.run(cfg, name=v.name, results_dir=runs, num_supernodes=TRAIN_CLIENTS + 2, replace=True).record()


def train_central(v: Variant, args: Settings, runs: Path) -> dict:
    """Central MAML with maml.pt's config and another seed, in this process, as experiments/sinusoid_central.py
    trains it (--central-iterations meta-iterations), saved as <runs>/<name>/model.pt."""
    cfg = load_meta_model(CENTRAL / "maml.pt").config.replace(compile=args.compile_central, **v.changes)
    t0 = time.perf_counter()
    trained = train_centrally(cfg, partition.full_source(cfg), iterations=args.central_iterations,
                              eval_every=args.central_iterations, log=False)
    save_meta_model(runs / v.name / "model.pt", trained.params, cfg, None)
    return {"iterations": args.central_iterations, "wall_seconds": time.perf_counter() - t0,
            "config_changes": v.changes}


# --- scoring ---------------------------------------------------------------------------------------------------
def protocol(cfg: Config, params, which: str, steps=STEPS) -> list[dict]:
    """The library's protocol: 600 fresh tasks of the whole family, 5-shot, 100 query points; `which` names
    the disjoint task set (test; validation for choosing rates), drawn with seed 0 whatever seed a model was
    trained with, so that every model is scored on the very same tasks as central MAML's maml.pt."""
    return evaluate_protocol(cfg, params, partition.full_source(Config()), tasks=600, shots=5, query_shots=100,
                             steps=steps, seed=TASK_SEED + SEED_OFFSETS[which])


def score(v: Variant, run_dir: Path, args: Settings) -> dict:
    """Final test and validation rows (FedAvg: fine-tuning rate tuned on 200 tuning tasks first) and the
    10-step test mean at `curve_points` evenly spaced checkpoints."""
    model = load_meta_model(run_dir / "model.pt")
    cfg, info = model.config, {}
    if cfg.algorithm == "pretrain":
        info = tune_inner_lr(cfg, model.params, partition.full_source(Config()), FINETUNE_LR, tasks=200, shots=5,
                             query_shots=100, steps=10, seed=TASK_SEED + SEED_OFFSETS["tuning"])
        cfg = cfg.replace(inner_lr=info["inner_lr"])
    out = {"test": protocol(cfg, model.params, "test"), "validation": protocol(cfg, model.params, "validation"),
           "inner_lr": cfg.inner_lr, "tuning": info, "curve": {}}
    if v.family in MAIN:
        ckpts = checkpoints(run_dir)
        for path in ckpts[max(1, len(ckpts) // args.curve_points) - 1::max(1, len(ckpts) // args.curve_points)]:
            curve_point(out["curve"], cfg, path)
    return out


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("round-*.pt"))


def curve_point(curve: dict, cfg: Config, path: Path) -> dict:
    """The 10-step test row of a checkpoint, cached in `curve` under its round."""
    ckpt = load_checkpoint(path)
    key = str(ckpt["round"])
    if key not in curve:
        curve[key] = protocol(cfg, ckpt["params"], "test", steps=(10,))[0]
    return curve[key]


def first_round(scored: dict, run_dir: Path, target: float) -> int | None:
    """The first checkpointed round whose 10-step test mean is <= target: the first scored curve point that
    reaches it, then every checkpoint before it in order (scores cached in scored["curve"], the answer in
    scored["reach"] under the target, so that the tables rebuild without the run's checkpoints); None: never."""
    key = repr(target)
    if key not in scored.setdefault("reach", {}):
        scored["reach"][key] = _first_round(scored, run_dir, target)
    return scored["reach"][key]


def _first_round(scored: dict, run_dir: Path, target: float) -> int | None:
    curve = scored["curve"]
    hits = [int(r) for r, row in curve.items() if row["loss"] <= target]
    if not hits:
        return None
    cfg = load_meta_model(run_dir / "model.pt").config.replace(inner_lr=scored["inner_lr"])
    for path in checkpoints(run_dir):
        rnd = int(path.stem.split("-")[1])
        if rnd > min(hits):
            break
        if curve_point(curve, cfg, path)["loss"] <= target:
            return rnd
    return min(hits)


# --- tables ----------------------------------------------------------------------------------------------------
def at(rows: list[dict], k: int) -> dict:
    return next(r for r in rows if r["steps"] == k)


def trio(rows: list[dict], key: str, fmt: str) -> str:
    return " / ".join(format(at(rows, k)[key], fmt) for k in (1, 5, 10))


def val10(s: dict) -> float:
    r = at(s["validation"], 10)
    return r["loss"] if r["diverged"] == 0 and math.isfinite(r["loss"]) else math.inf


def best_of_groups(scores: dict[str, dict]) -> dict[str, str]:
    """group -> its candidate with the lowest 10-step validation mean (a diverged validation task disqualifies)."""
    best: dict[str, str] = {}
    for name, s in scores.items():
        g = VARIANTS[name].group
        if VARIANTS[name].family in MAIN and (g not in best or val10(s) < val10(scores[best[g]])):
            best[g] = name
    return best


def settings_text(v: Variant) -> str:
    c = federation.app_config(**v.changes)
    parts = [f"meta-lr {c.meta_lr:g}"] if c.fusion == "average" else []
    parts.append(f"server {c.resolved_server_optimizer} lr {c.resolved_server_lr:g}"
                 + (f" momentum {c.server_momentum:g}" if c.server_momentum else ""))
    sched = [who for who, s in (("client", c.client_lr_schedule), ("server", c.server_lr_schedule)) if s == "cosine"]
    parts += [f"{' + '.join(sched)} rate cosine to {c.schedule_min_factor:g}"] if sched else []
    parts += [] if c.keep_optimizer_state else ["fresh client Adam each round"]
    parts += [] if c.aggregator == "mean" else [c.aggregator]
    parts += [f"fraction-train {c.fraction_train:g}"] if c.fraction_train < 1 else []
    parts += [f"{c.partition} partitions"] if c.partition != "non-iid" else []
    parts += [f"{c.drift_correction.upper()} drift correction"] if c.drift_correction != "none" else []
    parts += [f"seed {c.seed}"] if c.seed else []
    return ", ".join(parts)


def main_table(scores: dict, records: dict, reach: dict, central: dict, args: Settings) -> list[str]:
    ref = at(central["test"], 10)["loss"] if central else math.nan
    body = []
    for group, name in best_of_groups(scores).items():
        s, v = scores[name], VARIANTS[name]
        rounds, local = rounds_and_local(v, args)
        r = reach.get(name)
        body.append([group, name, settings_text(v) if v.family != "baseline" else
                     f"fine-tuning lr {s['inner_lr']:g} (tuned)", f"{rounds} × {local} × {v.clients}",
                     trio(s["test"], "loss", ".3f"), trio(s["test"], "median", ".3f"), trio(s["test"], "diverged", "d"),
                     "not reached" if r is None else f"{r} ({r * local * v.clients})",
                     f"{records.get(name, {}).get('wall_seconds', math.nan):.0f}",
                     f"{at(s['test'], 10)['loss'] / ref - 1:+.1%}"])
    if central:
        body.append(["central MAML", "results/sinusoid_central/maml.pt", "Adam 1e-3, meta-batch 25", "70000 its",
                     trio(central["test"], "loss", ".3f"), trio(central["test"], "median", ".3f"),
                     trio(central["test"], "diverged", "d"), "", f"{central['wall_seconds']:.0f}", "+0.0%"])
    return tables.markdown_table(["fusion", "run", "settings", "rounds × local × clients", "mean MSE 1 / 5 / 10",
                                  "median MSE 1 / 5 / 10", "diverged (of 600) 1 / 5 / 10",
                                  "rounds (client its) to FedAvg's final", "wall s", "mean 10 vs central"], body)


def tuning_table(scores: dict, chosen: set[str], central: dict, args: Settings) -> list[str]:
    def cells(s: dict) -> list[str]:
        return [f"{at(s[w], 10)['loss']:.3f} ({at(s[w], 10)['diverged']})" for w in ("validation", "test")]

    def split(v: Variant) -> str:
        return " × ".join(map(str, (*rounds_and_local(v, args), v.clients)))

    body = [[VARIANTS[n].group, n + (" (chosen)" if n in chosen else ""), settings_text(VARIANTS[n]),
             split(VARIANTS[n]), *cells(s)]
            for n, s in scores.items() if VARIANTS[n].family in ("average", "meta-gradient")]
    body += [["central MAML", "maml.pt", "(the reference)", "70000 its", *cells(central)]] if central else []
    return tables.markdown_table(["group", "run", "settings", "rounds × local × clients",
                                  "validation mean 10 (diverged)", "test mean 10 (diverged)"], body)


def seed_table(scores: dict, central: dict) -> list[str]:
    """FedMeta (tuned, and with SCAFFOLD) against central MAML, seed by seed (seed 0: the main table's runs), on
    the same 600 test tasks, and the mean over the seeds that all have: the seed spread a single-seed gap sits in."""
    runs = {0: [scores.get(n) for n in SEED_ROWS.values()] + [central or None]}
    runs |= {s: [scores.get(f"{n}-seed-{s}") for n in SEED_ROWS.values()] + [scores.get(f"central-seed-{s}")]
             for s in SEEDS}
    body, means = [], []
    for seed, rows in runs.items():
        if any(r is None for r in rows):
            continue
        losses = [at(r["test"], 10)["loss"] for r in rows]
        means.append(losses)
        body.append([str(seed), *(f"{x:.3f} ({at(r['test'], 10)['diverged']})" for x, r in zip(losses, rows)),
                     *(f"{x / losses[-1] - 1:+.1%}" for x in losses[:-1])])
    if len(body) > 1:
        m = [sum(col) / len(col) for col in zip(*means)]
        body.append([f"mean of {len(body)}", *(f"{x:.3f}" for x in m), *(f"{x / m[-1] - 1:+.1%}" for x in m[:-1])])
    return tables.markdown_table(["seed", *(f"{n}: mean MSE 10 (diverged)" for n in SEED_ROWS),
                                  "central MAML: mean MSE 10 (diverged)", *(f"{n} vs central" for n in SEED_ROWS)],
                                 body)


def diagnostic_lines(scores: dict, central: dict) -> list[str]:
    """The diagnostic federations (not candidates: another data split) against central MAML, one line each."""
    out = []
    for name, s in scores.items():
        if VARIANTS[name].family == "diagnostic" and central:
            t, ref = at(s["test"], 10), at(central["test"], 10)["loss"]
            out.append(f"Diagnostic, {VARIANTS[name].group} ({name}: {settings_text(VARIANTS[name])}, the same compute): "
                       f"test mean MSE 10 {t['loss']:.3f} ({t['diverged']} diverged), {t['loss'] / ref - 1:+.1%} vs "
                       f"central MAML.")
    return out


def byzantine_table(scores: dict, records: dict) -> list[str]:
    honest_mean = scores.get("byz-mean-honest")
    body = []
    for a in AGGREGATORS:
        honest = scores.get(f"byz-{a}-honest")
        for p in ("honest", *POLICIES):
            s = scores.get(f"byz-{a}-{p}")
            if s is None:
                continue
            t = at(s["test"], 10)
            body.append([a, "honest (all claims equal)" if p == "honest" else p, f"{t['loss']:.3f}",
                         f"{t['median']:.3f}", trio(s["test"], "diverged", "d"),
                         "" if honest is None or p == "honest" else f"{t['loss'] / at(honest['test'], 10)['loss'] - 1:+.1%}",
                         "" if honest_mean is None else f"{t['loss'] / at(honest_mean['test'], 10)['loss'] - 1:+.1%}",
                         f"{records.get(f'byz-{a}-{p}', {}).get('wall_seconds', math.nan):.0f}"])
    return tables.markdown_table(["aggregator", "weight policy", "mean MSE 10", "median MSE 10",
                                  "diverged 1 / 5 / 10", "vs its honest run", "vs honest mean", "wall s"], body)


def plot(scores: dict, chosen: list[str], args: Settings, path: Path) -> None:
    lines = []
    for name in chosen:
        pts = sorted((int(r), row["loss"]) for r, row in scores[name]["curve"].items())
        _, local = rounds_and_local(VARIANTS[name], args)
        if pts:
            lines.append(tables.Line(name, [r * local * VARIANTS[name].clients for r, _ in pts], [y for _, y in pts]))
    if lines:
        tables.plot(path, lines, xlabel="client meta-iterations", ylabel="test MSE after 10 steps (600 tasks)",
                    yscale="log", legend_size=7)


# --- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse(Settings, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    out, runs, store = args.out_dir, args.out_dir / "runs", args.out_dir / "scores"
    previous = tables.read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    records = dict(previous.get("runs", {}))
    todo = [n for n in VARIANTS if args.only is None or n in args.only]
    for name in sorted(todo, key=lambda n: n != "fedavg"):  # FedAvg first: its final MSE is the others' target
        records[name] = {"command": command(args, only=(name,)), **run(VARIANTS[name], args, runs)}
        tables.write_json(store / f"{name}.json", score(VARIANTS[name], runs / name, args))
    scores = {n: tables.read_json(store / f"{n}.json") for n in VARIANTS if (store / f"{n}.json").exists()}
    target = at(scores["fedavg"]["test"], 10)["loss"] if "fedavg" in scores else None
    reach = {}
    for name, s in scores.items():
        if target is not None and VARIANTS[name].family in MAIN:
            reach[name] = first_round(s, runs / name, target)
            tables.write_json(store / f"{name}.json", s)  # with the checkpoints scored on the way
    central = central_row() if (CENTRAL / "maml.pt").exists() else {}
    chosen = best_of_groups(scores)
    shipped = ship(scores, chosen, runs, out)
    lines = ["# Fusion benchmark, sinusoid (10 non-IID clients, 8 train)", "",
             (f"Matched compute: {args.rounds} rounds × {args.local} local meta-iterations × {TRAIN_CLIENTS} clients "
              f"= {args.rounds * args.local * TRAIN_CLIENTS} client meta-iterations ('average' fusion, FedAvg); "
              f"distributed MAML {args.grad_rounds} × 1 × {TRAIN_CLIENTS} = {args.grad_rounds * TRAIN_CLIENTS}. "
              f"FedAvg + fine-tuning's final 10-step mean: {target if target is None else f'{target:.3f}'}."), "",
             *main_table(scores, records, reach, central, args), "",
             "Every candidate (the chosen one per group: lowest validation mean after 10 steps, no diverged task):",
             "", *tuning_table(scores, set(chosen.values()), central, args), "",
             (f"Seed spread: FedMeta's tuned settings (without and with SCAFFOLD) and central MAML trained again "
              f"with seeds {list(SEEDS)} "
              "(seed 0: the rows above), the same compute each, scored on the same 600 test tasks:"), "",
             *seed_table(scores, central), "", *diagnostic_lines(scores, central), "",
             (f"Byzantine table: {args.byz_rounds} rounds × {args.local} × {TRAIN_CLIENTS} = "
              f"{args.byz_rounds * args.local * TRAIN_CLIENTS} client meta-iterations, FedMeta's tuned settings; "
              f"partitions {list(ATTACK.flip)} send sign-flipped ×{ATTACK.scale:g} updates, partition "
              f"{list(ATTACK.inflate)} claims {ATTACK.factor:g} × its weight:"), "", *byzantine_table(scores, records),
             "", f"Shipped: {json.dumps(shipped)}"]
    tables.write_text(out / "table.md", lines)
    plot(scores, [chosen[g] for g in chosen if VARIANTS[chosen[g]].family != "baseline"], args, out / "curve.png")
    rows = [{"run": n, "set": which, **r} for n, s in scores.items() for which in ("test", "validation")
            for r in s[which]]
    tables.write_csv(out / "eval.csv", rows)
    summary = {"command": command(args), "machine": tables.machine(), "settings": settings(args),
               "target_fedavg_mse10": target, "runs": records, "chosen": chosen, "shipped": shipped,
               "rounds_to_fedavg": reach, "central": central}
    tables.write_json(out / "summary.json", summary)
    print("\n".join(lines))
    return summary


def central_row() -> dict:
    model = load_meta_model(CENTRAL / "maml.pt")
    info = tables.read_json(CENTRAL / "summary.json") if (CENTRAL / "summary.json").exists() else {}
    return {"test": protocol(model.config, model.params, "test"),
            "validation": protocol(model.config, model.params, "validation"),
            "wall_seconds": info.get("maml", {}).get("train_seconds", math.nan)}


def ship(scores: dict, chosen: dict, runs: Path, out: Path) -> dict[str, str]:
    """The best model of each fusion family (lowest validation mean after 10 steps) as <out>/<family>.pt; for
    "average", the seed table's federations (all of that family) compete too: another seed is another model."""
    shipped = {}
    for family in ("average", "meta-gradient"):
        pool = [*chosen.values(), *(n for n in scores if VARIANTS[n].family == "seed" and family == "average")]
        names = [n for n in pool if VARIANTS[n].family in (family, "seed") and math.isfinite(val10(scores[n]))]
        if names:
            best = min(names, key=lambda n: val10(scores[n]))
            if (runs / best / "model.pt").exists():  # else (a clone without the git-ignored runs) it is shipped
                model = load_meta_model(runs / best / "model.pt")
                save_meta_model(out / f"{family}.pt", model.params, model.config.replace(results_dir="", run_name=""),
                                model.round)
            shipped[family] = best
    return shipped


if __name__ == "__main__":
    main()
