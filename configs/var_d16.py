"""VAR-d16 baseline on ImageNet 256x256 (FoundationVision/VAR README, "d16, 256x256").

    torchrun --nproc_per_node=8 ... train.py --depth=16 --bs=768 --ep=200 --fp16=1 \
      --alng=1e-3 --wpe=0.1

VAR shares MVAR's recipe (utils/arg_util.py, lr_control.py and train.py are the
same); it trains every scale in each step with the block-causal mask.
"""

from mvar_jax.configs import common


def get_config():
    c = common.get_config()
    c.model.family = "var"  # block-causal attention over all scales, one segment per step
    c.model.depth = 16  # --depth=16
    c.batch_size = 768  # --bs=768
    c.num_epochs = 200  # --ep=200
    c.init.adaln_gamma = 1e-3  # --alng=1e-3
    c.optim.final_lr_ratio = 0.1  # --wpe=0.1
    # VAR utils/data.py: resize the shorter side to mid_reso * 256, random crop.
    c.data.crop = "resize_random_crop"
    return c
