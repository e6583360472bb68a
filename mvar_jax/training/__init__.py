"""Training behind ``train.py``: one trainer (``trainer``) for every model, each model a
``task`` (``generator``: VAR/MVAR); checkpoints with exact resume, logging, export; the
generator's official recipe (optimizer, segment schedule, state, step)."""
