"""The trainer with a model other than the generator: a toy task through ``task.Task``.

Its state is not the generator's ``TrainState`` (a second counter rides along), two
train steps alternate by step index as a tokenizer's no-GAN / GAN steps would, and
it evaluates and exports through the trainer's helpers. Steps are a few float ops.
"""

from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvar_jax import checkpoint
from mvar_jax.configs import common
from mvar_jax.training import trainer, workdir
from mvar_jax.training.synthetic import SyntheticTokenSource

STEPS, SWITCH_AT, CRASH_AT = 6, 3, 5


@flax.struct.dataclass
class _State:
    step: jax.Array
    w: jax.Array  # (4,)
    second_steps: jax.Array  # steps taken by the second train step


class _ToyTask:
    """Fits ``w`` to the mean of the batch's first four tokens / 64."""

    finite_metrics = ("loss",)
    eval_every = 2

    @staticmethod
    def check_config(config):
        if config.toy_rate <= 0:
            raise ValueError(f"config.toy_rate={config.toy_rate} must be positive")

    def __init__(self, config, *, mesh, num_steps):
        del mesh, num_steps
        self._config = config
        self._served = 0
        self.architecture = workdir.Architecture("toy_config.json", {"width": 4})

    def _fresh(self) -> _State:
        return _State(step=jnp.zeros((), jnp.int32), w=jnp.zeros(4), second_steps=jnp.zeros((), jnp.int32))

    def abstract_state(self):
        return jax.eval_shape(self._fresh)

    def init_state(self, shardings):
        return jax.jit(self._fresh, out_shardings=shardings)()

    def train_steps(self):
        def make(second: bool):
            def train_step(state, batch):
                loss, grad = jax.value_and_grad(lambda w: jnp.mean((batch["x"] - w) ** 2))(state.w)
                return state.replace(
                    step=state.step + 1,
                    w=state.w - self._config.toy_rate * grad,
                    second_steps=state.second_steps + second,
                ), {"loss": loss}

            return train_step

        return [make(False), make(True)]

    def step_index(self, step):
        return int(step >= SWITCH_AT)

    def prepare_batch(self, batch):
        self._served += 1
        if self._served == self._config.toy_crash_at:
            raise RuntimeError("simulated crash")
        return {"x": batch["tokens"][:, :4].astype(jnp.float32) / 64}

    def summarize(self, step, scalars):
        return f"loss {scalars['loss']:.4f}", {"loss": f"{scalars['loss']:.4f}"}

    def evaluate(self, state, step, writer):
        writer.write_scalars(step, {"eval/w_mean": float(state.w.mean())})
        writer.write_image("toy", np.full((2, 3, 3), step, np.uint8), step)

    def export(self, state, model_dir):
        if jax.process_index() == 0:
            (model_dir / checkpoint.PARAMS_DIR).mkdir(parents=True, exist_ok=True)
            np.save(model_dir / checkpoint.PARAMS_DIR / "w.npy", np.asarray(state.w))


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(trainer.TASKS, "toy", _ToyTask)


def _config(crash_at: int = 0):
    c = common.trainer_config()
    c.task = "toy"
    c.batch_size, c.num_train_steps, c.log_every, c.checkpoint_every = 8, STEPS, 1, 3
    c.toy_rate, c.toy_crash_at = 0.5, crash_at
    return c


def _source():
    return SyntheticTokenSource(batch_size=8, seq_len=4, vocab_size=64, num_classes=10)


def test_a_second_task_trains_evaluates_and_exports(toy_task, tmp_path):
    state = trainer.train_and_evaluate(_config(), tmp_path, source=_source())
    assert isinstance(state, _State) and int(state.step) == STEPS
    assert int(state.second_steps) == STEPS - SWITCH_AT  # the step index picked the step
    assert json.loads((tmp_path / "toy_config.json").read_text()) == {"width": 4}
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [f"step_{s:08d}.png" for s in (2, 4, 6)]
    assert json.loads((tmp_path / "model" / workdir.EXPORTED_STEP).read_text()) == {"step": STEPS}
    np.testing.assert_array_equal(np.load(tmp_path / "model" / "params" / "w.npy"), state.w)
    # Another task's work directory is refused before it is touched.
    (tmp_path / "transformer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"different model \(transformer_config.json\)"):
        trainer.train_and_evaluate(_config(), tmp_path, source=_source())


def test_a_second_task_resumes_exactly(toy_task, tmp_path):
    straight = trainer.train_and_evaluate(_config(), tmp_path / "straight", source=_source())
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train_and_evaluate(_config(crash_at=CRASH_AT), tmp_path / "crashed", source=_source())
    resumed = trainer.train_and_evaluate(_config(), tmp_path / "crashed", source=_source())
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_the_config_picks_the_task(toy_task, tmp_path):
    config = _config()
    config.task = "vqgan"
    with pytest.raises(
        ValueError,
        match=r"config.task='vqgan' is unknown; expected one of "
        r"\('generator', 'tokenizer', 'toy'\)",
    ):
        trainer.train_and_evaluate(config, tmp_path, source=_source())
    config = _config()
    config.toy_rate = 0.0
    with pytest.raises(ValueError, match="config.toy_rate=0.0"):
        trainer.train_and_evaluate(config, tmp_path, source=_source())
    assert not list(tmp_path.iterdir())
