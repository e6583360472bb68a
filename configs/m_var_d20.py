"""M-VAR-d20 on ImageNet 256x256 (OliverRensu/MVAR README, "Training", d20).

    torchrun --nproc_per_node=8 ... train.py --depth=20 --bs=768 --ep=250 --fp16=1 \
      --alng=1e-3 --wpe=0.1

The d16 recipe (configs/m_var_d16.py, sources there) with a deeper model and
more epochs; attn_l2_norm stays off (the README's note covers d16 and d20).
"""

from configs import m_var_d16


def get_config():
    c = m_var_d16.get_config()
    c.model.depth = 20  # --depth=20 (embed 1280, 20 heads, drop path 0.0833)
    c.num_epochs = 250  # --ep=250
    return c
