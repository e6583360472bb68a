"""HACK for VAR (arXiv 2504.09261): calibrate a model's head kinds for a compressed KV cache.

    python -m mvar_jax.hack --checkpoint ckpt/var_d16 --calibrate      # writes head_kinds.json
    python -m mvar_jax.hack --checkpoint ckpt/var_d16                  # prints the stored kinds
    python sample.py --checkpoint ckpt/var_d16 --kv_compression 0.5 --kv_method hack --out s.png

The calibration draws ``--num_samples`` images (classes in turn), measures every head's
column variance (``sampling.head_kinds``) and stores the split beside the model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from mvar_jax import checkpoint, cli
from mvar_jax.errors import CheckpointError
from mvar_jax.sampling import SamplingOptions, check_kv_cache, head_kinds

PROG = "python -m mvar_jax.hack"
FLAGS = flags.FlagValues()
cli.define_checkpoint_flag(FLAGS)
flags.DEFINE_bool(
    "calibrate", False, f"measure the heads and write {head_kinds.FILE_NAME}", flag_values=FLAGS
)
flags.DEFINE_integer("num_samples", 50, "calibration images", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float(
    "contextual_fraction",
    0.5,
    "share of each block's heads (lowest column variance first) called contextual",
    lower_bound=0,
    upper_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_float("cfg", 1.5, "guidance of the calibration images", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "calibration images' seed", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "images per compiled call", lower_bound=1, flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    try:
        model = checkpoint.load_model(args.checkpoint)
        if not args.calibrate:
            print(head_kinds.summary(*head_kinds.load(args.checkpoint, model.transformer_config)))
            return 0
        check_kv_cache(model.transformer_config)
    except (CheckpointError, OSError, ValueError) as e:
        cli.usage_error(PROG, str(e))
    options = SamplingOptions(cfg=args.cfg, decode=False)
    statistics = head_kinds.head_statistics(
        model, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, options=options
    )
    contextual = head_kinds.classify(statistics, args.contextual_fraction)
    settings = {k: getattr(args, k) for k in ("num_samples", "contextual_fraction", "cfg", "seed")}
    path = head_kinds.save(args.checkpoint, statistics, contextual, settings)
    print(head_kinds.summary(statistics, contextual))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
