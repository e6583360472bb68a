"""M-VAR-d24 on ImageNet 256x256 (OliverRensu/MVAR README, "Training", d24).

    torchrun --nproc_per_node=8 ... train.py --depth=24 --bs=768 --ep=350 --tblr=8e-5 \
      --fp16=1 --alng=1e-4 --wpe=0.01

The d16 recipe (configs/m_var_d16.py, sources there) with the d24 command's
values. L2-normalised attention is on: arg_util.py's --anorm True, which the
README's attn_l2_norm=False note (d16, d20 only) leaves in place.
"""

from configs import m_var_d16


def get_config():
    c = m_var_d16.get_config()
    c.model.depth = 24  # --depth=24 (embed 1536, 24 heads, drop path 0.1)
    c.model.attn_l2_norm = True  # --anorm True (arg_util.py default)
    c.num_epochs = 350  # --ep=350
    c.optim.base_lr = 8e-5  # --tblr=8e-5 (peak lr 8e-5 * 768 / 256 = 2.4e-4)
    c.init.adaln_gamma = 1e-4  # --alng=1e-4
    c.optim.final_lr_ratio = 0.01  # --wpe=0.01
    return c
