"""VAR-d36-s on ImageNet 512x512 (FoundationVision/VAR README, "d36-s, 512x512 (-s means
saln=1, shared AdaLN)"): the release's var_d36.pth.

    torchrun --nproc_per_node=8 ... train.py --depth=36 --saln=1 --pn=512 --bs=768 --ep=350 \
      --tblr=8e-5 --fp16=1 --alng=5e-6 --wpe=0.01 --twde=0.08

    python train.py --config configs/var_d36.py --workdir DIR --config.data.data_dir=/path/to/tfds

The tokenizer is the 256 px release's vae_ch160v4096z32.pth, run on the 512 pyramid.
"""

from mvar_jax.configs import common
from mvar_jax.models.config import PATCH_NUMS_512


def get_config():
    c = common.get_config()
    c.model.family = "var"
    c.model.depth = 36  # --depth=36 (width 2304, 36 heads, drop path 0.15)
    c.model.shared_aln = True  # --saln=1: one AdaLN projection for every block
    c.model.patch_nums = PATCH_NUMS_512  # --pn=512
    c.data.image_size = 512  # data_load_reso = 32 * 16
    c.data.crop = "resize_random_crop"  # VAR utils/data.py, as configs/var_d16.py
    c.batch_size = 768  # --bs=768
    c.num_epochs = 350  # --ep=350
    c.optim.base_lr = 8e-5  # --tblr=8e-5 (per 256 images)
    c.init.adaln_gamma = 5e-6  # --alng=5e-6
    c.optim.final_lr_ratio = 0.01  # --wpe=0.01
    c.optim.weight_decay_end = 0.08  # --twde=0.08: half-cosine from --twd 0.05
    # 2.3B params: float32 params + Adam moments are ~37 GB; shard them (official: DDP).
    c.parallel.fsdp = True
    return c
