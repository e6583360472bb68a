"""``mvar_jax.cli``: absl parsing for in-process commands, the sampling flags."""

from __future__ import annotations

import pytest
from absl import flags

from mvar_jax import cli, sampling


def _flags() -> flags.FlagValues:
    values = flags.FlagValues()
    flags.DEFINE_string("out", None, "where", required=True, flag_values=values)
    flags.DEFINE_bool("overwrite", False, "replace", flag_values=values)
    cli.define_int_list("patch_nums", None, "sides", values, what="ints", example="1,2")
    cli.define_sampling_flags(values, batch_size=4, top_k=0, top_p=0.0)
    return values


def _error(capsys, values, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(values, argv, prog="prog", doc="doc")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("prog: error: ")
    return err


def test_every_parse_starts_from_the_defaults():
    values = _flags()
    args = cli.parse_flags(
        values, ["--out=a", "--overwrite", "--labels=3,1", "--top_k", "5"], prog="prog", doc=None
    )
    assert (args.out, args.overwrite, args.labels, args.top_k, args.batch_size) == ("a", True, (3, 1), 5, 4)
    assert cli.given(values, ("labels", "seed", "overwrite")) == ["--labels", "--overwrite"]
    args = cli.parse_flags(values, ["--out", "b"], prog="prog", doc=None)
    assert (args.out, args.overwrite, args.labels, args.top_k) == ("b", False, None, 0)
    assert cli.given(values, ("labels", "overwrite")) == []


def test_dashed_spellings_are_unknown_flags(capsys):
    """One spelling per flag: underscores."""
    assert (
        "unknown command line flag 'batch-size'"
        in _error(capsys, _flags(), ["--out=a", "--batch-size=2"]).lower()
    )


def test_bad_input_is_a_usage_error(capsys):
    values = _flags()
    assert "--out must have a value" in _error(capsys, values, [])
    assert "unknown command line flag 'outt'" in _error(capsys, values, ["--outt=a"]).lower()
    assert "unexpected arguments: extra" in _error(capsys, values, ["--out=a", "extra"])
    err = _error(capsys, values, ["--out=a", "--labels=3,x"])
    assert "expected comma-separated class ids such as 3,1, got '3,x'" in err
    assert "--batch_size=0" in _error(capsys, values, ["--out=a", "--batch_size=0"])
    cli.parse_flags(values, ["--out=a", "--top_p=2"], prog="prog", doc=None)
    with pytest.raises(SystemExit):
        cli.sampling_options(values, "prog")
    assert "prog: error: --top_p=2.0 must be in [0, 1] (0: off)" in capsys.readouterr().err
    cli.parse_flags(values, ["--out=a", "--cfg=-1"], prog="prog", doc=None)
    with pytest.raises(SystemExit):
        cli.sampling_options(values, "prog")
    assert "--cfg=-1.0 must be a finite number >= 0" in capsys.readouterr().err
    cli.parse_flags(values, ["--out=a", "--cfg=2", "--top_k=3"], prog="prog", doc=None)
    options = cli.sampling_options(values, "prog", decode=False)
    assert (options.cfg, options.top_k, options.top_p, options.decode) == (2.0, 3, 0.0, False)


def test_help_prints_the_doc_and_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(_flags(), ["--help"], prog="prog", doc="What prog does.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("What prog does.")
    assert "--patch_nums: sides" in out and "--batch_size: images per compiled call (default: 4)" in out


def test_further_sampling_options_become_flags(capsys):
    values = flags.FlagValues()
    cli.define_sampling_flags(values, batch_size=2, more=("chunk_tokens", "more_smooth"))
    cli.parse_flags(values, ["--chunk_tokens=64", "--more_smooth"], prog="prog", doc=None)
    options = cli.sampling_options(values, "prog")
    assert (options.chunk_tokens, options.more_smooth, options.decode_batch_size) == (
        64,
        True,
        sampling.SamplingOptions().decode_batch_size,
    )
    assert "--chunk_tokens=0: 0 is not a positive integer" in _error(capsys, values, ["--chunk_tokens=0"])


def test_distributed_flags_configure_only_a_job_they_join(capsys):
    values = flags.FlagValues()
    cli.define_distributed_flags(values)
    cli.parse_flags(values, [], prog="prog", doc=None)
    assert not cli.distributed_config(values, "prog").enabled
    cli.parse_flags(values, ["--num_processes=2", "--process_id=1"], prog="prog", doc=None)
    with pytest.raises(SystemExit):
        cli.distributed_config(values, "prog")
    err = capsys.readouterr().err
    assert "prog: error: --num_processes, --process_id configure --distributed, which is off" in err
    argv = ["--distributed", "--coordinator_address=h:1", "--num_processes=2", "--process_id=1"]
    cli.parse_flags(values, argv, prog="prog", doc=None)
    config = cli.distributed_config(values, "prog")
    assert (config.enabled, config.coordinator_address, config.num_processes, config.process_id) == (
        True,
        "h:1",
        2,
        1,
    )
