"""Old name of ``python -m mvar_jax.data.token_cache``, kept so that existing scripts run."""

import runpy
import warnings

if __name__ == "__main__":
    warnings.warn("renamed: python -m mvar_jax.data.token_cache", FutureWarning, stacklevel=1)
    runpy.run_module("mvar_jax.data.token_cache", run_name="__main__", alter_sys=True)
