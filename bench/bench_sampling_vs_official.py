"""Sampling and decoding on the CPU beside the official PyTorch code, same weights.

    python -m bench.bench_sampling_vs_official --out bench_out/sampling_vs_official \\
        --official_var PATH/TO/VAR --official_mvar PATH/TO/MVAR   # checkouts, never committed
    python -m bench.bench_sampling_vs_official --out /tmp/svo_smoke --smoke   # ours alone, toy

With a checkout, its classes are built as its ``build_vae_var`` / ``build_vae_mvar``
build them at ``--depth`` (the transformer's own initialisation; the VQVAE, which
they leave uninitialised, drawn from small normals), saved as state dicts and
converted with ``mvar_jax.convert``: both sides sample from the same weights.
Without one, ours samples from ``bench_sampling.random_model``'s. The official
MVAR runs with ``bench.official``'s NATTEN stand-in (no CPU build of NATTEN here).

Each side runs in a process of its own with every core, float32, ``--batch`` images,
cfg 1.5, top-k 900, top-p 0.96 (the papers' FID setting):

* ``first call``: the first sampling call without decoding (ours: tracing and
  compilation included; theirs: the first eager call);
* ``per call``: the median of ``--reps`` calls after a warm-up, without and with the
  VQVAE decode (the official VAR sampler decodes inside: its decoder is replaced by
  the identity for the row without);
* ``decode``: the VQVAE decoder alone (``fhat_to_img``) on ``--batch`` feature maps.

Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import tempfile
from typing import Any

from absl import flags

from bench import common, official as official_code

CFG, TOP_K, TOP_P = 1.5, 900, 0.96
SEED = 0
# What each side measures: (key, row title); "{title}" is the family's.
ROWS = (
    ("first_s", "{title} first call, no decode (compilation included)"),
    ("sample_s", "{title} sampling, no decode, per call"),
    ("sample_decode_s", "{title} sampling with decode, per call"),
    ("decode_s", "VQVAE decode of {batch} images (`fhat_to_img`), per call"),
)


def _converted(case: dict[str, Any]):
    """The official state dicts ``case['weights']`` holds, converted, at float32."""
    from mvar_jax import checkpoint, convert

    weights = pathlib.Path(case["weights"])
    out = weights / "converted"
    transformer = ["--" + case["family"], str(weights / "transformer.pth")]
    convert.main(["--vae", str(weights / "vae.pth"), *transformer, "--out", str(out)])
    return checkpoint.load_model(out)


def ours(case: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from bench.bench_sampling import random_model
    from mvar_jax import sampling
    from mvar_jax.models.vqvae import VQVAE

    model = (
        random_model(case["family"], case["smoke"], "float32")
        if case["weights"] is None
        else _converted(case)
    )
    model = model._replace(transformer_config=dataclasses.replace(model.transformer_config, dtype="float32"))
    labels = jnp.arange(case["batch"]) % model.transformer_config.num_classes
    options = sampling.SamplingOptions(cfg=CFG, top_k=TOP_K, top_p=TOP_P)
    calls = itertools.count()

    def draw(decode: bool):
        key = jax.random.PRNGKey(next(calls))
        return jax.block_until_ready(
            sampling.sample(model, labels, key, dataclasses.replace(options, decode=decode))
        )

    first, per_call = common.timed(lambda: draw(False), 1, case["reps"])
    _, with_decode = common.timed(lambda: draw(True), 1, case["reps"])
    # Features of the shape the sampler hands the decoder; its time does not depend on their values.
    pn, cvae = model.transformer_config.patch_nums[-1], model.vqvae_config.z_channels
    f_hat = jax.random.normal(jax.random.PRNGKey(SEED), (case["batch"], pn, pn, cvae))
    decode = jax.jit(lambda params, f: VQVAE(model.vqvae_config).apply(params, f, method=VQVAE.fhat_to_img))
    _, decode_s = common.timed(
        lambda: jax.block_until_ready(decode(model.vqvae_params, f_hat)), 1, case["reps"]
    )
    times = dict(first_s=first, sample_s=per_call, sample_decode_s=with_decode, decode_s=decode_s)
    return dict(times, depth=model.transformer_config.depth)


def official(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mvar_jax.models.config import PATCH_NUMS_256

    family, B = case["family"], case["batch"]
    vae, net = official_code.build(case["checkout"], family, case["depth"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():  # the builder leaves the VQVAE uninitialised
            p.normal_(0.0, 0.02)
    weights = pathlib.Path(case["weights"])
    torch.save(vae.state_dict(), weights / "vae.pth")
    torch.save(net.state_dict(), weights / "transformer.pth")
    vae.eval()
    net.eval()
    label_B = torch.arange(B) % net.num_classes
    decode_inside = family == "var"  # VAR's sampler returns images, MVAR's the features
    infer = net.autoregressive_infer_cfg if decode_inside else net.autoregressive_infer
    decoder = vae.fhat_to_img

    def draw(decode: bool):
        with torch.no_grad():
            vae.fhat_to_img = decoder if decode else (lambda f_hat: f_hat)
            out = infer(B=B, label_B=label_B, g_seed=SEED, cfg=CFG, top_k=TOP_K, top_p=TOP_P)
            return decoder(out) if decode and not decode_inside else out

    first, per_call = common.timed(lambda: draw(False), 1, case["reps"])
    _, with_decode = common.timed(lambda: draw(True), 1, case["reps"])
    f_hat = torch.randn(B, vae.Cvae, PATCH_NUMS_256[-1], PATCH_NUMS_256[-1])
    with torch.no_grad():
        _, decode_s = common.timed(lambda: decoder(f_hat), 1, case["reps"])
    times = dict(first_s=first, sample_s=per_call, sample_decode_s=with_decode, decode_s=decode_s)
    return dict(times, version=f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def markdown(rows: list[dict[str, Any]], head: dict[str, Any]) -> str:
    from mvar_jax.models import families

    lines = [
        f"{head['device']}, mvar_jax on jax {head['jax']}, official on {head['official'] or '-'}; "
        f"d{head['depth']}, batch {head['batch']}, cfg {CFG}, top-k {TOP_K}, top-p {TOP_P}, float32, "
        f"{head['date']}{' (smoke: toy model)' if head['smoke'] else ''}.",
        "",
        "| path | official s | mvar_jax s | mvar_jax / official |",
        "| --- | ---: | ---: | ---: |",
    ]
    decode_done = False
    for r in rows:
        title = f"{families.get(r['family']).title}-d{head['depth']}"
        for key, text in ROWS:
            if key == "decode_s" and decode_done:
                continue  # one tokenizer: its decode is measured once
            decode_done |= key == "decode_s"
            mine, theirs = r["ours"][key], (r.get("official") or {}).get(key)
            ratio = "-" if theirs is None else f"{mine / theirs:.2f}"
            theirs = "-" if theirs is None else f"{theirs:.2f}"
            lines.append(
                f"| {text.format(title=title, batch=head['batch'])} | {theirs} | {mine:.2f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


PROG = "python -m bench.bench_sampling_vs_official"
FLAGS = flags.FlagValues()
official_code.define_flags(
    FLAGS, "our side alone on the toy model, one timed call (CI)", depth=16, batch=2, unit="call"
)
flags.DEFINE_list("families", ["mvar", "var"], "mvar and/or var", flag_values=FLAGS)
flags.DEFINE_integer("reps", 3, "timed calls after the warm-up", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = official_code.parse_or_measure(FLAGS, argv, PROG, __doc__, ours, official)
    if args is None:
        return
    unknown = sorted(set(args.families) - {"mvar", "var"})
    if unknown:
        from mvar_jax import cli

        cli.usage_error(PROG, f"--families: unknown {unknown}; the official code has mvar and var")
    checkouts = {"var": args.official_var, "mvar": args.official_mvar}
    rows, official_version = [], None
    for family in args.families:
        case = dict(family=family, depth=args.depth, batch=args.batch, reps=args.reps, smoke=args.smoke)
        with tempfile.TemporaryDirectory() as weights:
            row = dict(family=family)
            if checkouts[family] and not args.smoke:
                row["official"] = common.run_case(
                    "bench.bench_sampling_vs_official",
                    dict(case, side="official", checkout=checkouts[family], weights=weights),
                )
                official_version = row["official"]["version"]
            case["weights"] = weights if "official" in row else None
            if args.smoke:
                row["ours"] = ours(dict(case, reps=1))
            else:
                row["ours"] = common.run_case("bench.bench_sampling_vs_official", dict(case, side="ours"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = common.header(
        depth=rows[0]["ours"]["depth"], batch=args.batch, official=official_version, smoke=args.smoke
    )
    common.write_results(args.out, {"header": head, "rows": rows}, markdown(rows, head))


if __name__ == "__main__":
    main()
