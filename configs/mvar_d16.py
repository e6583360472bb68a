"""MVAR-d16 from scratch on ImageNet 256x256 (official README, "Example for MVAR-d16").

    torchrun --nproc_per_node=8 ... train.py --depth=16 --bs=448 --ep=300 --fp16=1 \
      --alng=1e-3 --wpe=0.1

    python train.py --config configs/mvar_d16.py --workdir DIR \
      --config.data.data_dir=/path/to/tfds
"""

from mvar_jax.configs import common


def get_config():
    c = common.get_config()
    c.model.depth = 16  # --depth=16 (embed 1024, 16 heads, drop path 0.0667)
    c.batch_size = 448  # --bs=448 (global; peak lr 1e-4 * 448 / 256 = 1.75e-4)
    c.num_epochs = 300  # --ep=300
    c.init.adaln_gamma = 1e-3  # --alng=1e-3
    c.optim.final_lr_ratio = 0.1  # --wpe=0.1
    return c
