"""The trainer behind ``python -m arpo_fast.train``.

``loop``: one step (rollout -> reward -> advantage -> update) and the loop over steps;
``run_state``: the run's state and the setup that builds it;
``config``: every setting as one dataclass (``cli``: the command line built from it); ``update``: the
clipped policy-gradient update over micro-batches; ``optim``: fp32 master weights around AdamW;
``data``: prompts and their order; ``checkpoint`` and ``checkpoint_save``: checkpoints that survive
a crash at any moment; ``run_dir``: the run folder; ``interrupts``: Ctrl-C and SIGTERM; ``demo``:
the built-in job.
"""

from arpo_fast.train.cli import parse_config
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.loop import Run, fit, main, setup, train, train_step

__all__ = ["Run", "TrainConfig", "fit", "main", "parse_config", "setup", "train", "train_step"]
