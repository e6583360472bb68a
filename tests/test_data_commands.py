"""The data commands run under their old module names, which hand over to the new ones
(``python -m mvar_jax.data.token_cache`` and ``python -m mvar_jax.data.records``)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_old_command_names_run_the_new_commands():
    """Each old name warns with the new one and runs the new command's ``__main__`` (its
    flags are defined), without runpy's warning that the module was imported twice."""
    commands = {  # old module -> (new module, a flag the new command defines)
        "mvar_jax.data.cache_tokens": ("mvar_jax.data.token_cache", "--vae"),
        "mvar_jax.data.prepare": ("mvar_jax.data.records", "--manual_dir"),
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {  # started together: most of each run is importing jax
        old: subprocess.Popen(
            [sys.executable, "-m", old, "--helpshort"],  # absl prints the flags, exits 1
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for old in commands
    }
    for old, (new, flag) in commands.items():
        out, err = procs[old].communicate(timeout=300)
        assert f"FutureWarning: renamed: python -m {new}" in err
        assert "RuntimeWarning" not in err and "Traceback" not in err, err
        assert f"python -m {new} " in out and flag in out  # the new command's usage and flags
