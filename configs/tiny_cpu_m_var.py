"""The M-VAR twin of configs/tiny_cpu.py: the same tokenizer, width, depth, data and steps.

    python train.py --config configs/tiny_cpu_m_var.py --workdir /tmp/tiny_m_var   # after make demo
    python train.py --config configs/tiny_cpu_m_var.py:fixture --workdir /tmp/tiny_m_var

Attention within each scale plus a Mamba2 layer per block running causally over
the whole pyramid; every step teaches all scales (one segment, as VAR), and
sampling carries each block's Mamba state from scale to scale. MVAR's segment
and neighbourhood settings (``ratio_k``, ``model.refine_step``,
``model.kernel_size``) mean nothing to it. Everything but the model family comes
from tiny_cpu, so MVAR, VAR and M-VAR cannot drift apart; the Mamba2 layer needs
``2 * embed_dim`` to be a multiple of its 64-wide heads.
"""

from mvar_jax.configs import tiny_cpu


def get_config(tokenizer: str = "demo"):
    c = tiny_cpu.get_config(tokenizer)
    c.model.family = "m_var"
    return c
