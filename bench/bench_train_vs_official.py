"""Train-step speed on the CPU beside the official PyTorch step, at a size a CPU trains.

    python -m bench.bench_train_vs_official --out bench_out/train_vs_official \\
        --official_var PATH/TO/VAR --official_mvar PATH/TO/MVAR   # checkouts, never committed
    python -m bench.bench_train_vs_official --out /tmp/tvo_smoke --smoke   # ours alone, seconds

Both sides train the same model: the official layout at ``--depth`` (width 64 x depth,
depth heads), 256 px pyramid, the released tokenizer's vocabulary (4096) and latent
width (32), 1000 classes, ``--batch`` images, float32, random weights and tokens; one
step is the forward, the per-token weighted cross-entropy (trainer.py's
``loss_weight``), the backward, clipping at 2 and AdamW (betas 0.9/0.95, decay 0.05).
Ours: ``training.step.make_train_step`` jitted with the state donated, as the trainer
runs it; theirs: the classes of the official ``models/`` built as its
``build_vae_var`` / ``build_vae_mvar`` build them (fused and flash kernels off:
none runs on a CPU), stepped eagerly as its trainer steps them. Rows: VAR's whole
pyramid, MVAR's three segments (scales 1-10, block-diagonal; 13x13 and 16x16,
spatial-Markov: the official side with ``bench.official``'s NATTEN stand-in).

Columns: ``first step s`` (ours: tracing and compilation included; theirs: the first
eager step), ``s/step`` the median of ``--steps`` steps after ``--warmup``, each
side in a process of its own with every core; ``ours / official``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from absl import flags

from bench import official as official_code
from bench.common import header, run_case, timed, toy_configs, write_results
from mvar_jax.models import families
from mvar_jax.models.config import PATCH_NUMS_256, TransformerConfig
from mvar_jax.models.segments import Segment

VOCAB, CVAE, CLASSES = 4096, 32, 1000
# family, segment (scales [first, last)).
ROWS = (("var", (0, 10)), ("mvar", (0, 8)), ("mvar", (8, 9)), ("mvar", (9, 10)))


def _pyramid(smoke: bool) -> dict[str, Any]:
    """The official 256 px pyramid and MVAR attention (TransformerConfig's defaults), or the
    smoke runs' toy ones (``bench.common.toy_configs``)."""
    if not smoke:
        return {}
    toy = toy_configs("mvar")[1]
    return dict(patch_nums=toy.patch_nums, refine_step=toy.refine_step, kernel_size=toy.kernel_size)


def _batch(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    L = TransformerConfig().seq_len
    return {
        "label": rng.integers(0, CLASSES, (batch,)).astype(np.int32),
        "tokens": rng.integers(0, VOCAB, (batch, L)).astype(np.int32),
        "x_BLCv": rng.normal(size=(batch, L - 1, CVAE)).astype(np.float32),
    }


def ours(case: dict[str, Any]) -> dict[str, Any]:
    import jax

    from mvar_jax.configs import common
    from mvar_jax.models.config import InitScales
    from mvar_jax.models.transformer import Transformer
    from mvar_jax.training import optimizer, state as state_lib, step as step_lib

    depth = case["depth"]
    config = TransformerConfig(
        family=case["family"],
        vocab_size=VOCAB,
        cvae=CVAE,
        num_classes=CLASSES,
        depth=depth,
        drop_path_rate=None,
        dtype="float32",
        **_pyramid(case["smoke"]),
    )
    recipe = common.get_config()
    tx, lr = optimizer.make_optimizer(
        optimizer.OptimizerConfig(**recipe.optim),
        global_batch_size=case["batch"],
        total_steps=1000,
        decay_mask=optimizer.official_decay_mask,
    )
    key = jax.random.PRNGKey(0)
    state = state_lib.create_train_state(
        state_lib.init_params(config, InitScales(**recipe.init), key), tx, key
    )
    data = _batch(case["batch"])
    batch = {
        "label": data["label"],
        "tokens": data["tokens"][:, : config.seq_len],
        "x_BLCv": data["x_BLCv"][:, : config.seq_len - 1],
    }
    step = jax.jit(
        step_lib.make_train_step(Transformer(config), tx, lr, Segment(*case["segment"]), label_smoothing=0.0),
        donate_argnums=0,
    )
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    first, per_step = timed(run, case["warmup"], case["steps"])
    return {"first_s": first, "step_s": per_step}


def official(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    family = case["family"]
    _, net = official_code.build(case["checkout"], family, case["depth"], shared_aln=False, attn_l2_norm=True)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    data = {k: torch.from_numpy(v) for k, v in _batch(case["batch"]).items()}
    label, tokens, x = data["label"].long(), data["tokens"].long(), data["x_BLCv"]
    L = tokens.shape[1]
    begin, end = TransformerConfig().token_range(*case["segment"])
    loss_weight = torch.ones(1, L) / L
    ce = torch.nn.CrossEntropyLoss(reduction="none")

    def run():
        if family == "var":
            logits = net(label, x)
        else:
            logits = net(
                label_B=label, x_BlCv_wo_first_l=x[:, max(begin - 1, 0) : end - 1], L_bg=begin, L_ed=end
            )
        V = logits.shape[-1]
        loss = ce(logits.reshape(-1, V), tokens[:, begin:end].reshape(-1)).view(tokens.shape[0], -1)
        loss = loss.mul(loss_weight[:, begin:end]).sum(dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
        opt.step()

    first, per_step = timed(run, case["warmup"], case["steps"])
    return {
        "first_s": first,
        "step_s": per_step,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def markdown(rows: list[dict[str, Any]], head: dict[str, Any]) -> str:
    lines = [
        f"{head['device']} (jax {head['jax']}; torch {head.get('torch', '-')}), depth {head['depth']}, "
        f"batch {head['batch']}, float32, {head['date']}.",
        "",
        "| model | segment | ours first step s | official first step s | ours s/step | official s/step "
        "| ours / official |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ours_, theirs = r["ours"], r.get("official")
        cells = [
            f"{families.get(r['family']).title}-d{head['depth']}",
            r["name"],
            f"{ours_['first_s']:.2f}",
            "-" if theirs is None else f"{theirs['first_s']:.2f}",
            f"{ours_['step_s']:.3f}",
            "-" if theirs is None else f"{theirs['step_s']:.3f}",
            "-" if theirs is None else f"{ours_['step_s'] / theirs['step_s']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PROG = "python -m bench.bench_train_vs_official"
FLAGS = flags.FlagValues()
official_code.define_flags(
    FLAGS, "our side alone on the toy pyramid, 2 steps (CI)", depth=4, batch=2, unit="step"
)
flags.DEFINE_integer("warmup", 2, "untimed steps after the first", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "timed steps", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = official_code.parse_or_measure(FLAGS, argv, PROG, __doc__, ours, official)
    if args is None:
        return
    checkouts = {"var": args.official_var, "mvar": args.official_mvar}
    base = dict(depth=args.depth, batch=args.batch, warmup=args.warmup, steps=args.steps, smoke=args.smoke)
    if args.smoke:
        base.update(depth=1, warmup=0, steps=2)
    rows, torch_version = [], None
    for family, segment in ROWS[:2] if args.smoke else ROWS:
        if args.smoke:
            segment = (0, 4) if family == "var" else (0, 2)
        case = dict(base, family=family, segment=list(segment))
        patch_nums = _pyramid(args.smoke).get("patch_nums", PATCH_NUMS_256)
        row = dict(family=family, name=Segment(*segment).name(patch_nums))
        row["ours"] = (
            ours(case) if args.smoke else run_case("bench.bench_train_vs_official", dict(case, side="ours"))
        )
        if checkouts[family] and not args.smoke:
            row["official"] = run_case(
                "bench.bench_train_vs_official", dict(case, side="official", checkout=checkouts[family])
            )
            torch_version = row["official"]["torch"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = header(depth=base["depth"], batch=base["batch"], torch=torch_version or "-")
    write_results(args.out, {"header": head, "rows": rows}, markdown(rows, head))


if __name__ == "__main__":
    main()
