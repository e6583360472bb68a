"""Trains a model from a config file (``config.task``); all logic lives in mvar_jax.training.

    python train.py --config configs/tiny_cpu.py --workdir /tmp/tiny
    python train.py --config configs/mvar_d16.py --workdir DIR --config.batch_size=64

Running again with the same --workdir resumes from its last checkpoint. A second run
on a work directory in use, or a full disk, stops with a message (exit status 1).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mvar_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and the final model go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
    # Multi-host start-up must precede every JAX computation, including any a
    # module might run at import time, hence the late import.
    parallel.initialize_distributed(config.parallel.distributed)
    from mvar_jax.training import trainer, workdir

    try:
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except (workdir.WorkdirInUse, workdir.DiskFull) as e:
        sys.exit(f"train.py: {e}")  # says what to do; Orbax's stack would not


if __name__ == "__main__":
    app.run(main)
