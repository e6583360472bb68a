"""Measuring generators.

As the papers score them (OpenAI's guided-diffusion evaluator, on the features of the 2015
TensorFlow Inception-v3: ``models.inception``, its weights read by ``weights.inception``):
``features`` (batched, data-parallel extraction), ``metrics`` (FID, sFID, Inception Score),
``precision_recall``, ``batches`` (the ``.npz`` batches) and the command
``python -m mvar_jax.eval.fid``. On the built-in dataset, for the demo: ``classifier``
(a small judge trained on the data) and ``quality`` (its report, ``python -m
mvar_jax.eval.quality``). ``image_metrics``: reconstruction losses, PSNR, SSIM. See docs/quality.md.
"""
