"""Old name of ``python -m mvar_jax.data.records``, kept so that existing scripts run."""

import runpy
import warnings

if __name__ == "__main__":
    warnings.warn("renamed: python -m mvar_jax.data.records", FutureWarning, stacklevel=1)
    runpy.run_module("mvar_jax.data.records", run_name="__main__", alter_sys=True)
