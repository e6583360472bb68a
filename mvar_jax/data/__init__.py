"""Input pipelines behind one interface, the built-in dataset and the token cache.

    from mvar_jax import data
    source = data.build_train_source(cfg.data, global_batch_size=256, process_index=0,
                                     process_count=1, seed=0)
    batch = next(source)        # {'image': (b, S, S, 3) uint8, 'label': (b,) int32}
    state = source.get_state()  # JSON-serialisable; source.set_state(state) resumes

The modules, in the order an example travels: ``config`` (the data ConfigDict),
``records`` (encoded images by index from an image folder or TFDS, and the loader
that decodes them), ``preprocess`` (crops, flip, ``to_pm1``), ``order`` (which
example goes where, and when), ``batching`` (resumable host batches, device
prefetch) and ``pipeline`` (the two builders above). Beside them:
``builtin_shapes``, the default dataset, and ``token_cache``. See docs/data.md.
"""

from mvar_jax.data.batching import BatchSource, DevicePrefetch
from mvar_jax.data.config import default_config
from mvar_jax.data.pipeline import build_eval_source, build_train_source
from mvar_jax.data.preprocess import BadImageError, to_pm1
from mvar_jax.data.token_cache import TokenCache, sharded_encoder, write_token_cache

__all__ = [
    "BadImageError",
    "BatchSource",
    "DevicePrefetch",
    "TokenCache",
    "build_eval_source",
    "build_train_source",
    "default_config",
    "sharded_encoder",
    "to_pm1",
    "write_token_cache",
]
