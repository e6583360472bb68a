"""The VAR tokenizer (vae_ch160v4096z32.pth's architecture) trained on ImageNet 256 px.

    python train.py --config configs/vqvae_imagenet256.py --workdir runs/vqvae \
        --config.data.data_dir=/data/tfds \
        --config.loss.lpips_vgg=pretrained/vgg16-397923af.pth \
        --config.loss.lpips_lin=pretrained/lpips_vgg_v0.1.pth

Neither VAR nor MVAR publishes its tokenizer's training recipe. The sources, cited
per value: the architecture is the released checkpoint's (VAR ``models/__init__.py``
``build_vae_var`` and ``models/vqvae.py``); the VAR paper's implementation details
say it is a VQGAN-style VQVAE with a shared V = 4096 codebook and 16x downsampling,
trained on OpenImages with L2 + VQ + perceptual + GAN losses; the optimisation
and loss weights are FoundationVision/vaex's defaults (``utils/arg_util.py``, the
VAR authors' later tokenizer trainer; it also trains on OpenImages + CC12M and
uses a DINO discriminator); the PatchGAN is VQGAN's (taming-transformers
``configs/imagenet_vqgan.yaml``, ``VQLPIPSWithDiscriminator``). Not reproduced:
vaex's EMA of the weights, its discriminator augmentation and warm-up ramp, its
entropy loss, and the lower clamp (0.015) of its adaptive weight.
"""

import math

from mvar_jax.configs import common


def _vaex_adam(lr: float, weight_decay: float):
    """vaex's AdamW settings, shared by its VAE and discriminator optimizers."""
    return common.tokenizer_optim(
        base_lr=lr,
        b1=0.5,  # vaex --*_opt_beta 0.5_0.9 (= VQGAN's Adam)
        b2=0.9,
        weight_decay=weight_decay,
        grad_clip=10.0,  # vaex --grad_clip 10
        schedule="cos",  # vaex --sche cos
        warmup_start=0.005,  # vaex --wp0 0.005
        final_lr_ratio=0.3,  # vaex --sche_end 0.3
    )


def get_config():
    c = common.tokenizer_config()

    m = c.model  # VAR build_vae_var / VQVAE defaults = the release's vae_ch160v4096z32.pth
    m.vocab_size = 4096  # VAR build_vae_var(V=4096); paper: V = 4096
    m.z_channels = 32  # VAR build_vae_var(Cvae=32)
    m.ch = 160  # VAR build_vae_var(ch=160); vaex --ch 160
    m.ch_mult = (1, 1, 2, 2, 4)  # VAR vqvae.py ddconfig (16x downsampling); = VQGAN f16
    m.num_res_blocks = 2  # VAR vqvae.py ddconfig; = VQGAN imagenet_vqgan.yaml
    m.using_sa = True  # VAR vqvae.py ddconfig using_sa=True
    m.using_mid_sa = True  # VAR vqvae.py ddconfig using_mid_sa=True
    m.quant_conv_ks = 3  # VAR VQVAE(quant_conv_ks=3)
    m.quant_resi = 0.5  # VAR VQVAE(quant_resi=0.5)
    m.share_quant_resi = 4  # VAR build_vae_var(share_quant_resi=4)
    m.using_znorm = False  # VAR VQVAE(using_znorm=False)
    m.beta = 0.25  # VAR VQVAE(beta=0.25); vaex --vq_beta 0.25
    m.patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR --pn 1_2_3_4_5_6_8_10_13_16

    d = c.data
    # Our choice: ImageNet (the paper and vaex train on OpenImages; point data at an
    # image folder of it to follow them).
    d.name = "imagenet2012"
    d.image_size = 256  # 16 * 16; vaex --img_size 256
    d.crop = "resize_random_crop"  # vaex utils/data.py: resize to mid_reso, random crop
    d.mid_reso = 1.125  # vaex --mid_reso 1.125
    d.hflip = False  # vaex --hflip False
    d.num_classes = 1000  # ImageNet (labels are not used)
    c.num_train_examples = common.IMAGENET_TRAIN_EXAMPLES

    c.batch_size = 768  # vaex --bs 768 (global)
    c.num_epochs = 250  # vaex --ep 250
    steps = c.num_epochs * math.ceil(c.num_train_examples / c.batch_size)

    loss = c.loss
    loss.l1 = 0.2  # vaex --l1 0.2
    loss.l2 = 1.0  # vaex --l2 1.0; the official VAR training forward's mse
    loss.vq = 1.0  # VQGAN codebook_weight 1.0; vaex adds the VQ loss unweighted
    loss.lpips = 0.5  # vaex --lp 0.5
    loss.lpips_vgg = "pretrained/vgg16-397923af.pth"  # our choice of path (torchvision's file)
    loss.lpips_lin = "pretrained/lpips_vgg_v0.1.pth"  # our choice of path (lpips' v0.1/vgg.pth)

    gan = c.gan
    gan.weight = 0.4  # vaex --ld 0.4 (> 0: with the adaptive weight)
    gan.adaptive = True  # vaex --gada 1 / VQGAN calculate_adaptive_weight
    gan.start = round(0.2 * steps)  # vaex: disc_start_ep = 0.2 * ep when unset
    gan.loss = "hinge"  # vaex --dcrit hg; VQGAN disc_loss 'hinge'
    gan.ndf = 64  # VQGAN NLayerDiscriminator ndf 64
    gan.n_layers = 3  # VQGAN disc_num_layers 3
    gan.optim = _vaex_adam(lr=3e-4, weight_decay=0.0005)  # vaex --disc_lr 3e-4 --disc_wd 5e-4
    # Our choice: no warm-up for the discriminator, which starts late anyway.

    c.optim = _vaex_adam(lr=3e-4, weight_decay=0.005)  # vaex --vae_lr 3e-4 --vae_wd 0.005
    c.optim.warmup_fraction = 0.01  # vaex: warmup_ep = 0.01 * ep when unset

    c.codebook.window = 1000  # our choice: about 0.8M images a window
    c.codebook.dead_after = 0  # our choice: off, as in VAR / vaex (no restart there)

    c.log_every = 100  # our choice
    c.checkpoint_every = 2000  # our choice
    c.eval_every = 5000  # our choice
    c.eval_images = 1000  # our choice
    c.eval_batch_size = 64  # our choice
    c.grid_images = 8  # our choice
    c.parallel.fsdp = False  # our choice: the 0.1B VQVAE + discriminator fit replicated
    return c
