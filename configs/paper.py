"""The paper's grid: 6 sources x 3 axes x 5 target variants x 3 seeds.

    python -m xft_jax.sweep --config=configs/paper.py --sweep_dir=runs/paper
    python -m xft_jax.sweep --config=configs/paper.py --sweep_dir=... --dry_run

Every variant runs under the same protocol (xft_jax/config_defaults.py): validation carved from
the training split, plain causal-LM loss, a fixed number of epochs, the best-validation
checkpoint scored on test, one label-independent prompt room.
"""

import ml_collections

from xft_jax.study import grid


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/paper.py takes no argument, got {arg!r}; override fields "
                         f"instead (e.g. --config.variants=\"('label_only','explanation')\")")
    c = ml_collections.ConfigDict()
    c.sources = tuple(grid.SOURCES)
    c.axes = tuple(grid.AXES)
    c.variants = tuple(grid.PAPER_VARIANTS)
    c.seeds = (0, 1, 2)   # override: --config.seeds="(0,1)"
    c.train_config = "configs/mistral_7b.py"
    # Where each source's rated data lives ({source} is substituted).
    c.data_path = "data/rated/{source}"
    # Extra --config.* overrides passed to every training run.
    c.overrides = ()
    c.probe = True
    c.max_attempts = 2
    # local: run cells here one after another; gpu_node / slurm / tpu_pod: write one job
    # script per cell and submit it through launch/.
    c.launcher = "local"
    return c
