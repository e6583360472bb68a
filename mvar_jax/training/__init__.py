"""Training behind ``train.py``: one trainer (``trainer``) for every model, each model a
``task`` (``generator``: an MVAR, VAR or M-VAR transformer on a frozen tokenizer;
``tokenizer``: the multi-scale VQVAE); checkpoints with exact resume, logging, export; the
generator's official recipe (optimizer, segment schedule, state, step)."""
