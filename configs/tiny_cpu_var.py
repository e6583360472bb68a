"""The VAR twin of configs/tiny_cpu.py: the same tokenizer, width, depth, data and steps.

    python train.py --config configs/tiny_cpu_var.py --workdir /tmp/tiny_var   # after make demo
    python train.py --config configs/tiny_cpu_var.py:fixture --workdir /tmp/tiny_var

Block-causal attention over every scale, one segment per step (no 8:1 cycle),
sampled with a KV cache: the baseline MVAR is compared with at the same budget.
Everything but the attention pattern comes from tiny_cpu, so the two cannot drift.
"""

from mvar_jax.configs import tiny_cpu


def get_config(tokenizer: str = "demo"):
    c = tiny_cpu.get_config(tokenizer)
    c.model.family = "var"
    return c
