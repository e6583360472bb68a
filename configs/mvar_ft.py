"""MVAR fine-tuned from VAR at depth 16, 20 or 24 (official README, "Example for MVAR-d16 /
MVAR-d20 / MVAR-d24 (Fine-tuning)"). The depth is the config's argument:

    python train.py --config configs/mvar_ft.py:d16 --workdir runs/mvar_d16_ft \
      --config.data.data_dir=/path/to/tfds

    torchrun --nproc_per_node=8 ... train.py --depth=16 --bs=448 --ep=80 --fp16=1 \
      --alng=1e-3 --wpe=0.1 --finetune_from_var=True          # d20: --bs=192; d24: --bs=448

The VAR weights (same key layout as MVAR) replace the whole initialisation; the
optimizer starts fresh, as in the official train.py.
"""

from __future__ import annotations

import ml_collections

from mvar_jax.configs import common

# --bs of each depth's README command (global batch).
_BATCH_SIZE = {"d16": 448, "d20": 192, "d24": 448}
DEPTHS = tuple(_BATCH_SIZE)


def get_config(depth: str | None = None) -> ml_collections.ConfigDict:
    """The fine-tune recipe at ``depth`` ('d16', 'd20' or 'd24')."""
    c = common.get_config()
    # --depth (embed 64 * depth, depth heads, drop path 0.1 * depth / 24: common.py)
    c.model.depth = common.check_depth("mvar_ft", depth, DEPTHS)
    c.batch_size = _BATCH_SIZE[depth]  # --bs
    c.num_epochs = 80  # --ep=80
    c.init.adaln_gamma = 1e-3  # --alng=1e-3 (overwritten by the VAR weights)
    c.optim.final_lr_ratio = 0.1  # --wpe=0.1
    # --finetune_from_var=True with --var_ckpt. The official --var_ckpt default is fixed at
    # var_d16.pth (a class attribute evaluated with depth=16), so d20 and d24 runs must point
    # at their own depth's weights.
    c.finetune_from = f"pretrained/var_{depth}.pth"
    # d24 has ~1B params: float32 params + Adam moments are ~16 GB; shard them (FSDP)
    # rather than replicate (official: DDP). Results are the same either way.
    c.parallel.fsdp = depth == "d24"
    return c
