"""Scoring samples as the MVAR / VAR / M-VAR papers do (OpenAI's guided-diffusion evaluator).

``inception`` (the 2015 TensorFlow Inception-v3 in Flax), ``inception_weights`` (its
pt_inception-2015-12-05 state dict), ``features`` (batched, data-parallel extraction),
``metrics`` (FID, sFID, Inception Score), ``precision_recall``, ``batches`` (the ``.npz``
batches) and the command ``python -m mvar_jax.eval.fid``; see docs/quality.md.
"""
