"""What the command-line entry points share: absl flag parsing and the sampling flags.

Every entry point uses absl flags, spelled with underscores (``--num_per_class``). A command
that tests call in-process (``main(argv)``) keeps its flags in a ``flags.FlagValues`` of its
own, so that several can be imported at once, and parses them with ``parse_flags``: each call
starts from the defaults, ``--help`` prints the command's docstring and flags, and bad input
exits with status 2 and ``<prog>: error: <what>`` on stderr, as argparse did.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import textwrap
import types
from collections.abc import Sequence
from typing import Any, NoReturn

from absl import flags

from mvar_jax import sampling


def user_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/mvar_jax`` (``~/.cache/mvar_jax``): what the commands keep between runs."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mvar_jax"


def define_compilation_cache_flag(flag_values: flags.FlagValues) -> None:
    """``--compilation_cache DIR`` (``mvar_jax.compilation_cache.enable``)."""
    flags.DEFINE_string(
        "compilation_cache",
        None,
        "keep compiled programs here for the next run (default: $MVAR_JAX_COMPILATION_CACHE or "
        "~/.cache/mvar_jax/xla; '' turns it off)",
        flag_values=flag_values,
    )


def _ints(text: str, what: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated {what} such as {example}, got {text!r}") from None


class IntListParser(flags.ArgumentParser):
    """absl parser of comma-separated ints: ``"3,1"`` -> ``(3, 1)``."""

    syntactic_help = "comma-separated integers"

    def __init__(self, what: str, example: str):
        self._what, self._example = what, example

    def parse(self, argument):
        if isinstance(argument, (tuple, list)):
            return tuple(int(a) for a in argument)
        return _ints(argument, self._what, self._example)

    def flag_type(self) -> str:
        return "int list"


def define_int_list(
    name: str, default: str | None, help_text: str, flag_values: flags.FlagValues, *, what: str, example: str
):
    """A ``--name=3,1`` flag whose value is a tuple of ints (None when not given)."""
    return flags.DEFINE(
        IntListParser(what, example),
        name,
        default,
        help_text,
        flag_values=flag_values,
        serializer=flags.ListSerializer(","),
    )


def usage_error(prog: str, message: str) -> NoReturn:
    """Exits with status 2 and ``<prog>: error: <message>`` on stderr (argparse's convention)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _config_flag_error(error: Exception, argv: Sequence[str]) -> str:
    """A config-file flag's failure (ml_collections' ``config_flags``) in a line or two.

    A misspelt field in an override (``--config.modle.depth=2``) surfaces as a KeyError or
    AttributeError whose message suggests the field; a config file that cannot be loaded
    or whose ``get_config`` raises, as an error wrapping a traceback: its last line says it.
    """
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip()
    if isinstance(error, (KeyError, AttributeError)):
        field, _, hint = message.partition("\n")
        override = next((a for a in argv if a.startswith("--config.") and field.strip("'") in a), None)
        return f"{override or 'a --config override'}: no config field {field}{'; ' + hint if hint else ''}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if isinstance(error, OSError) and "No such file" in lines[-1]:
        return f"--config: file not found: {lines[-1].rpartition(': ')[2]}"
    return f"{lines[0]} {lines[-1]}" if len(lines) > 2 else " ".join(lines)


def parse_flags(
    flag_values: flags.FlagValues, argv: Sequence[str] | None, *, prog: str, doc: str | None
) -> types.SimpleNamespace:
    """Parses ``argv`` (``sys.argv[1:]`` when None) into ``flag_values``, every flag starting
    from its default, and returns the values by name. ``--help`` prints ``doc`` and the
    flags, then exits 0; an unknown flag, a bad value, a missing required flag, a
    positional argument or a config file that does not load (``config_flags``) is a
    ``usage_error``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(f"{(doc or '').strip()}\n\nflags:")
        for name in sorted(flag_values):
            flag = flag_values[name]
            default = "" if flag.default is None else f" (default: {flag.default_as_str[1:-1]})"
            print(
                textwrap.fill(
                    f"--{name}: {flag.help}{default}", 96, initial_indent="  ", subsequent_indent="      "
                )
            )
        raise SystemExit(0)
    flag_values.unparse_flags()
    # config_flags finds the overrides to define (--config.a.b=...) in sys.argv, not in the
    # arguments it is given: it must hold them while they parse, for a main(argv) call too.
    saved_argv, sys.argv = sys.argv, [prog, *argv]
    try:
        rest = flag_values([prog, *argv])
        values = flag_values.flag_values_dict()
        for value in values.values():  # a config file that failed to load raises when touched
            getattr(value, "to_dict", None)
    except flags.IllegalFlagValueError as e:
        usage_error(prog, _config_flag_error(e, argv))
    except flags.Error as e:
        usage_error(prog, str(e))
    except (KeyError, AttributeError, OSError) as e:  # config_flags' own, see _config_flag_error
        usage_error(prog, _config_flag_error(e, argv))
    finally:
        sys.argv = saved_argv
    if len(rest) > 1:
        usage_error(prog, f"unexpected arguments: {' '.join(rest[1:])}")
    return types.SimpleNamespace(**values)


def given(flag_values: flags.FlagValues, names: Sequence[str]) -> list[str]:
    """``--name`` for each of ``names`` that the command line set."""
    return [f"--{n}" for n in names if flag_values[n].present]


def define_distributed_flags(flag_values: flags.FlagValues) -> None:
    """``--distributed`` and what configures it (``distributed_config``)."""
    flags.DEFINE_bool(
        "distributed",
        False,
        "join a multi-host job (jax.distributed.initialize; the address, process count and id "
        "are auto-detected on SLURM, Open MPI and Cloud TPU, or given below)",
        flag_values=flag_values,
    )
    for name, default, help_text in (
        ("coordinator_address", None, "host:port of process 0"),
        ("num_processes", -1, "the process count (-1: detect)"),
        ("process_id", -1, "this process's id (-1: detect)"),
    ):
        define = flags.DEFINE_string if default is None else flags.DEFINE_integer
        define(name, default, f"with --distributed: {help_text}", flag_values=flag_values)


def distributed_config(flag_values: flags.FlagValues, prog: str) -> types.SimpleNamespace:
    """``define_distributed_flags``' values as ``parallel.initialize_distributed`` takes them;
    a ``usage_error`` when they configure a job that ``--distributed`` does not join."""
    named = given(flag_values, ("coordinator_address", "num_processes", "process_id"))
    if named and not flag_values.distributed:
        usage_error(prog, f"{', '.join(named)} configure --distributed, which is off")
    return types.SimpleNamespace(
        enabled=flag_values.distributed,
        coordinator_address=flag_values.coordinator_address,
        num_processes=flag_values.num_processes,
        process_id=flag_values.process_id,
    )


def define_checkpoint_flag(flag_values: flags.FlagValues) -> None:
    """``--checkpoint DIR`` (required): the generator model a command samples from."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "generator model directory (written by python -m mvar_jax.convert or train.py)",
        required=True,
        flag_values=flag_values,
    )


# A flag per SamplingOptions field a command may expose: how to define it, its help.
_OPTION_FLAGS = {
    "cfg": (flags.DEFINE_float, "classifier-free guidance scale (>= 0)"),
    "top_k": (flags.DEFINE_integer, "keep the k most likely tokens; 0: off"),
    "top_p": (flags.DEFINE_float, "nucleus mass to keep; 0: off"),
    "more_smooth": (flags.DEFINE_bool, "Gumbel-softmax codebook mixing (visualisation only, not for FID)"),
    "decode_batch_size": (
        functools.partial(flags.DEFINE_integer, lower_bound=1),
        "images the VQVAE decodes at a time, so that decoding never sets the peak memory",
    ),
    "chunk_tokens": (
        functools.partial(flags.DEFINE_integer, lower_bound=1),
        "MVAR: tokens per chunk of images each scale runs at a time (memory vs speed)",
    ),
}
_FILTERS = ("top_k", "top_p")


def define_sampling_flags(
    flag_values: flags.FlagValues,
    *,
    batch_size: int,
    more: Sequence[str] = (),
    why: str = "",
    **defaults: float,
) -> None:
    """``--labels --batch_size --seed``, ``--cfg --top_k --top_p`` and a flag for each further
    ``SamplingOptions`` field in ``more``, with the dataclass's defaults unless ``defaults``
    names others (and ``why``, said in the filters' help)."""
    options = sampling.SamplingOptions(**defaults)
    define_int_list(
        "labels",
        None,
        "comma-separated class ids (default: every class)",
        flag_values,
        what="class ids",
        example="3,1",
    )
    flags.DEFINE_integer(
        "batch_size", batch_size, "images per compiled call", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_integer("seed", 0, "batch b draws from fold_in(PRNGKey(seed), b)", flag_values=flag_values)
    for name in ("cfg", *_FILTERS, *more):
        define, help_text = _OPTION_FLAGS[name]
        note = f"; {why}" if why and name in _FILTERS else ""
        define(name, getattr(options, name), help_text + note, flag_values=flag_values)


def sampling_options(flag_values: flags.FlagValues, prog: str, **fields: Any) -> sampling.SamplingOptions:
    """The ``SamplingOptions`` of ``define_sampling_flags``' values (and ``fields``); a
    ``usage_error`` naming the flag when one is invalid."""
    given_options = {name: flag_values[name].value for name in _OPTION_FLAGS if name in flag_values}
    try:
        return sampling.SamplingOptions(**given_options, **fields)
    except ValueError as e:
        usage_error(prog, f"--{e}")
