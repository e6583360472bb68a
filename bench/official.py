"""The official PyTorch code, importable on a CPU for the side-by-side benches.

The checkouts (FoundationVision/VAR, CVL-UESTC/MVAR) stay outside the repository; this
module puts one on ``sys.path`` with stand-ins for the two imports a CPU lacks: the Hub
mixin (never called here) and NATTEN, whose ``na2d`` has no CPU build here. The
stand-in computes the same neighbourhood attention (dilation 1, the window shifted
inward at the borders: tests/fixtures/official/README.md) as dense attention under
the windows' mask: at the models' maps (at most 16x16) a CPU's quickest exact way.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import types
from collections.abc import Callable
from typing import Any

from absl import flags

from bench import common

_HUB = """\
class PyTorchModelHubMixin:
    def __init_subclass__(cls, **kwargs):
        pass
"""

_NATTEN = '''\
import torch
import torch.nn.functional as F


def _window_mask(h, w, k):
    """(h*w, h*w) bool: True where a key lies in the query's k x k window (shifted inward
    at the borders)."""
    masks = []
    for n in (h, w):
        start = (torch.arange(n) - k // 2).clamp(0, n - k)
        pos = torch.arange(n)
        masks.append((pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + k))
    rows, cols = masks
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, h * w)


def na2d(query, key, value, kernel_size, dilation=1, scale=None, **unused):
    """(B, H, W, heads, head_dim) -> same: each query attends to its kernel_size^2 window."""
    if dilation != 1 or unused:
        raise NotImplementedError(f"the NATTEN stand-in has dilation 1 only, got {dilation}, {unused}")
    B, H, W, heads, D = query.shape
    q, k, v = (x.reshape(B, H * W, heads, D).transpose(1, 2) for x in (query, key, value))
    mask = _window_mask(H, W, kernel_size)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, heads, D)
'''


def importable(checkout: str | pathlib.Path) -> None:
    """Puts ``checkout`` (its ``models`` package) and the stand-ins first on ``sys.path``."""
    stubs = pathlib.Path(tempfile.mkdtemp())
    for name, text in (("huggingface_hub", _HUB), ("natten", _NATTEN)):
        (stubs / name).mkdir()
        (stubs / name / "__init__.py").write_text(text)
    sys.path[:0] = [str(checkout), str(stubs)]


def build(checkout: str | pathlib.Path, family: str, depth: int, **kwargs):
    """(VQVAE, transformer) of ``family`` ('var' or 'mvar') as the checkout's ``build_vae_var`` /
    ``build_vae_mvar`` build them at the 256 px pyramid, on the CPU, fused and flash kernels off
    (none runs on a CPU)."""
    from mvar_jax.models.config import PATCH_NUMS_256

    importable(checkout)
    import models  # the official package

    builder = models.build_vae_var if family == "var" else models.build_vae_mvar
    return builder(
        device="cpu",
        patch_nums=PATCH_NUMS_256,
        depth=depth,
        flash_if_available=False,
        fused_if_available=False,
        **kwargs,
    )


def define_flags(flag_values: flags.FlagValues, smoke: str, *, depth: int, batch: int, unit: str) -> None:
    """A side-by-side bench's flags: ``common.define_flags``' (``--case`` too), the optional
    checkouts ``--official_var`` and ``--official_mvar``, ``--depth`` and ``--batch`` (images a
    ``unit``)."""
    common.define_flags(flag_values, smoke, case=True)
    for family, repo in (("var", "FoundationVision/VAR"), ("mvar", "CVL-UESTC/MVAR")):
        flags.DEFINE_string(
            f"official_{family}", None, f"a {repo} checkout (optional)", flag_values=flag_values
        )
    flags.DEFINE_integer(
        "depth",
        depth,
        "transformer blocks (width 64 x depth, depth heads)",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer("batch", batch, f"images per {unit}", lower_bound=1, flag_values=flag_values)


Side = Callable[[dict[str, Any]], dict[str, Any]]


def parse_or_measure(
    flag_values: flags.FlagValues,
    argv: list[str] | None,
    prog: str,
    doc: str | None,
    ours: Side,
    official: Side,
) -> types.SimpleNamespace | None:
    """The bench's flags; None once this process, a ``common.run_case`` child given ``--case``,
    has measured that one side of the case and printed it as JSON."""
    from mvar_jax import cli

    args = cli.parse_flags(flag_values, argv, prog=prog, doc=doc)
    if args.case is None:
        return args
    case = json.loads(args.case)
    print(json.dumps(official(case) if case["side"] == "official" else ours(case)))
    return None
