"""Trains a model from a config file (``config.task``); all logic lives in mvar_jax.training.

    python train.py --config configs/tiny_cpu.py:fixture --workdir /tmp/tiny   # minutes on a CPU
    python train.py --config configs/mvar_d16.py --workdir DIR --config.batch_size=64

``--config FILE[:ARG]`` names an ml_collections config file (``configs/``), ``:ARG`` its
``get_config`` argument; ``--config.a.b=VALUE`` overrides any field. (configs/tiny_cpu.py without
``:fixture`` trains on the tokens of the tokenizer that ``make demo`` trains first.) Running again
with the same --workdir resumes from its last checkpoint. A mistake in the command line or the
config stops with one line (exit status 2); a work directory in use by another run, or a full
disk, with a message (exit status 1).
"""

import sys
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from mvar_jax import cli, parallel
from mvar_jax.errors import CheckpointError, ConfigError

PROG = "train.py"
FLAGS = flags.FlagValues()  # this command's own, as every command's (mvar_jax.cli)
config_flags.DEFINE_config_file(
    "config", None, "config file, configs/<name>.py[:arg]", flag_values=FLAGS, lock_config=True
)
flags.DEFINE_string("workdir", None, "checkpoints, logs and the final model go here", flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    missing = [f"--{name}" for name in ("config", "workdir") if getattr(args, name) is None]
    if missing:
        cli.usage_error(PROG, f"{' and '.join(missing)} required (see {PROG} --help)")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
    # Multi-host start-up must precede every JAX computation, including any a
    # module might run at import time, hence the late import.
    parallel.initialize_distributed(args.config.parallel.distributed)
    from mvar_jax.training import trainer, workdir

    try:
        trainer.train_and_evaluate(args.config, args.workdir)
    except (ConfigError, CheckpointError) as e:
        cli.usage_error(PROG, str(e))
    except (workdir.WorkdirInUse, workdir.DiskFull) as e:
        print(f"{PROG}: {e}", file=sys.stderr)  # says what to do; Orbax's stack would not
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
