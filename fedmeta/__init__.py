"""fedmeta: federated meta-learning (MAML family, LSTM meta-optimizer) on Flower.

The meta-learning core lives here and never imports Flower; the Flower ClientApp is in
`clients/`, the strategy and ServerApp in `strategies/`. Names below are imported lazily so that
a client process (a new one per message in deployment) pays only for what it uses.
"""

from importlib import import_module

__version__ = "0.1.0"
_LAZY = {"Config": "config", "ConfigError": "config", "MetaModel": "results", "load_meta_model": "results",
         "load_run": "results", "load_runs": "results", "plot_run": "results", "adapt": "use", "Learner": "use"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fedmeta' has no attribute {name!r}")
