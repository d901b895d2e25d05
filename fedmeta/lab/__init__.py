"""The experiment library: what the scripts in experiments/ and benchmarks/ share, imported normally.

- `args`:       a script's command line as a typed dataclass (help on every field), `--quick` presets, and
                the exact command that re-runs a parsed run (`command`);
- `federation`: run a real Flower federation from a `Config` (`fedmeta run` as a subprocess; never imports
                Flower) and get its run directory back;
- `central`:    central meta-training (iterations or a wall-clock budget, a validation curve, a device);
- `protocol`:   the evaluation protocol (adapt to fresh tasks, mean / 95 % CI / median / diverged /
                accuracy per number of steps) and fine-tuning-rate tuning for the non-meta-learned baselines;
- `optimizers`: hand-designed optimizers with tuned learning rates, the learned optimizer's baselines;
- `tables`:     CSV / JSON / markdown writing (pandas), machine info, the 95 % interval, the plotting helper.

Modules are imported on use (`from fedmeta.lab import tables`); nothing here imports flwr.
"""
