"""MVAR on ImageNet 512x512: no official recipe exists (the official MVAR trains at 256 px
only, though its arg_util.py knows ``--pn 512``), so this is VAR-d36-s's 512 px recipe
(configs/var_d36.py) with MVAR's attention, at the depth given as the argument:

    python train.py --config configs/mvar_512.py:d16 --workdir DIR --config.data.data_dir=/path/to/tfds
    python train.py --config configs/mvar_512.py:d36 --workdir DIR \
      --config.finetune_from=pretrained/var_d36.pth      # MVAR from the 512 px VAR release

The attention fitted to the 512 pyramid (1, 2, 3, 4, 6, 9, 13, 18, 24, 32): refine step 8 and
kernel 7, as at 256 px. The two largest maps (24x24 and 32x32, 71% of the 2240 tokens) take
spatial-Markov attention over 7x7 neighbourhoods, so each of their tokens attends to 49 keys
instead of 576 or 1024; the first eight scales (640 tokens) train together, block-diagonal,
in the 8:1:1 cycle. A 7x7 window spans the same 112 px of the image as at 256 px.
"""

from __future__ import annotations

import ml_collections

from mvar_jax.configs import common, var_d36

DEPTHS = ("d16", "d20", "d24", "d30", "d36")


def get_config(depth: str | None = None) -> ml_collections.ConfigDict:
    """VAR-d36-s's 512 px recipe with MVAR attention at ``depth``; shared AdaLN at d36 (the
    layout of var_d36.pth, to fine-tune from it)."""
    c = var_d36.get_config()
    c.model.family = "mvar"
    c.model.depth = common.check_depth("mvar_512", depth, DEPTHS)
    c.model.shared_aln = depth == "d36"
    c.model.refine_step = 8  # --refine_step 8: 24x24 and 32x32 are spatial-Markov
    c.model.kernel_size = 7  # --kernel_size 7
    c.parallel.fsdp = depth in ("d30", "d36")
    return c
