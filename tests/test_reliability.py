"""Nothing is lost and nothing silently changes: exact resume after SIGKILL, clean stops on
SIGTERM, corrupt checkpoints, best-K and time-based checkpoints, the non-finite guard, sweep
relaunches, the run-dir lock, float32 master weights, and the security rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, replace, run_module, tiny_config
from jaxformer.config import ModelConfig
from jaxformer.errors import UserError
from jaxformer.data.tasks import build_task
from jaxformer.models import build_model
from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.loop import train
from jaxformer.runs import TIMING_KEYS, RunDir
from jaxformer.training.run_dir import RunLock
from jaxformer.models import split_model
from jaxformer.objectives import OBJECTIVES
from jaxformer.training.state import create_train_state
from jaxformer.training.step import make_train_step

RUN_CLI = [
    "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_len=16",
    "task.max_digits=2", "task.eval_size=16", "trainer.batch_size=8", "trainer.eval_batch_size=16",
    "trainer.log_every=1", "trainer.eval_every=100", "trainer.checkpoint_every=20",
    "trainer.keep_checkpoints=20", "trainer.steps=100", "trainer.progress=false",
    "logger.wandb.mode=offline",
]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which no two runs share."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "jaxformer.train", *RUN_CLI,
                             f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Until checkpoint `step` is complete (orbax renames it into place when it is)."""
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None, f"the run ended before checkpoint {step}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no checkpoint {step} after 240 s"
        time.sleep(0.02)


# a wandb API key in the environment of the reference run below: it must never reach the run dir
SECRET = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reference run, with a wandb API key set as a user's would be (offline wandb)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = run_module("jaxformer.train", *RUN_CLI, f"hydra.run.dir={run_dir}",
                      env={"WANDB_API_KEY": SECRET})
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir, done


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_run_resumes_to_the_same_bits(uninterrupted_run, tmp_path, stop):
    """SIGKILL at an arbitrary point (mid-step, even mid-save) or SIGTERM (a clean stop with its
    own checkpoint), then the same command: metrics.jsonl equals the uninterrupted run's."""
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_checkpoint(proc, run_dir, 40)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=240)
    if stop == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("stopped by SIGTERM at step ") and "rerun the same command" in last
        stopped_at = int(last.split("at step ")[1].split()[0])
        assert (run_dir / "checkpoints" / str(stopped_at)).is_dir()
    assert not (run_dir / "finished.json").exists()
    run_id = (run_dir / "wandb_run_id").read_text()

    resumed = run_module("jaxformer.train", *RUN_CLI, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert records(run_dir) == records(uninterrupted_run[0])
    assert (run_dir / "wandb_run_id").read_text() == run_id  # the wandb run continues
    assert {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")} == {run_id}


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, caplog):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(tiny_config(), straight)
    train(tiny_config(), broken)
    (broken / "finished.json").unlink()  # as if it crashed after its last checkpoint
    for path in (broken / "checkpoints" / "6").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0garbage")
    leftover = broken / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000"  # a torn save
    leftover.mkdir()
    result = train(tiny_config(), broken)
    assert result.step == 6 and records(broken) == records(straight)
    assert "checkpoints/6 does not restore" in caplog.text and "falling back" in caplog.text
    assert (broken / "checkpoints_unrestorable" / "6").is_dir()  # moved aside, not deleted


def test_no_restorable_checkpoint_is_one_clear_line(tmp_path):
    train(tiny_config(), tmp_path)
    (tmp_path / "finished.json").unlink()
    for path in (tmp_path / "checkpoints").rglob("*"):
        if path.is_file() and path.parent.name == "state":
            path.write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"none of the 2 checkpoints in .* restores") as caught:
        train(tiny_config(), tmp_path)
    assert "\n" not in str(caught.value)


def test_keeps_latest_n_plus_best_k(tmp_path):
    """keep_checkpoints=1 and keep_best=1 by eval loss: the latest and the best survive."""
    config = replace(tiny_config(steps=12, eval_every=2, checkpoint_every=2, keep_checkpoints=1,
                                 keep_best=1, best_metric="loss"),
                     optim={"lr": 3e-2, "warmup_steps": 0, "schedule": "constant"})
    train(config, tmp_path)
    evals = [r for r in records(tmp_path) if r["split"] == "eval"]
    best = min(evals, key=lambda r: r["loss"])["step"]
    kept = {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}
    assert kept == {best, 12}


def test_time_based_checkpoints(tmp_path):
    config = tiny_config(steps=5, checkpoint_every=100, keep_checkpoints=10, eval_every=100,
                         checkpoint_minutes=1e-9)
    train(config, tmp_path)
    kept = {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}
    assert kept == {1, 2, 3, 4, 5}


# -- non-finite guard -----------------------------------------------------------------------------
def test_a_non_finite_step_is_not_applied():
    """The jitted step leaves parameters and optimizer state untouched when the loss is NaN."""
    cfg = ModelConfig(vocab_size=17, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16)
    graphdef, params, rest = split_model(build_model(cfg, 0))
    tx = optax.adam(1e-3)
    step = make_train_step(graphdef, rest, tx, optax.constant_schedule(1e-3), OBJECTIVES["clm"])
    task = build_task(tiny_config().task)
    batch = OBJECTIVES["clm"].eval_arrays(task, task.eval_problems()[:4])
    state = create_train_state(params, tx, 0)
    state, metrics = step(state, batch)
    assert not metrics["nonfinite"] and int(state.skipped) == 0
    poisoned = jax.tree.map(lambda x: x, state)
    embed = poisoned.params["embed"]["embedding"]
    embed.set_value(embed.get_value().at[0, 0].set(jnp.nan))
    before = jax.tree.map(np.asarray, (poisoned.params, poisoned.opt_state))
    after, metrics = step(poisoned, batch)
    assert metrics["nonfinite"] and int(after.skipped) == 1 and int(after.step) == 2
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(old, np.asarray(new))


def test_skip_mode_counts_then_gives_up(tmp_path):
    """lr 1e30: after step 1 every step is non-finite; skip mode logs them and stops at the cap."""
    config = replace(tiny_config(steps=20, eval_every=100, checkpoint_every=100, nonfinite="skip",
                                 max_skipped_steps=3),
                     optim={"lr": 1e30, "clip_norm": 0.0, "warmup_steps": 0})
    with pytest.raises(FloatingPointError, match="4 steps skipped .*max_skipped_steps=3"):
        train(config, tmp_path)
    skipped = [r for r in records(tmp_path) if r["split"] == "train" and r["nonfinite"]]
    assert [r["skipped_steps"] for r in skipped] == [1, 2, 3, 4]
    assert RunDir(tmp_path).state() == "diverged"  # what jaxformer.compare reports


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
    config = replace(tiny_config(steps=4), model={"dtype": "bfloat16"})
    train(config, tmp_path)
    checkpointer = Checkpointer(tmp_path / "checkpoints", 3, 3)
    meta = checkpointer.read_meta(4)
    assert meta["model"]["param_dtype"] == "float32"
    restored = checkpointer.manager.restore(
        4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))  # as saved, no target
    dtypes = {str(np.asarray(leaf).dtype) for leaf in jax.tree.leaves(restored.state["params"])}
    assert dtypes == {"float32"}
    assert all(np.isfinite(r["loss"]) for r in records(tmp_path) if r["split"] == "train")


# -- run dirs and sweeps --------------------------------------------------------------------------
def test_two_runs_never_share_a_run_dir(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=r"is in use by pid \d+ on .*: wait for that run"):
            train(tiny_config(), tmp_path)
    assert train(tiny_config(), tmp_path).step == 6  # the lock went with its holder


def test_relaunched_sweep_skips_finished_jobs_and_resumes_interrupted_ones(tmp_path):
    fixed = [arg for arg in RUN_CLI if not arg.startswith(("trainer.steps=", "logger.",
                                                            "trainer.checkpoint_every="))]
    sweep = [*fixed, "trainer.steps=6", "trainer.checkpoint_every=3", "logger.wandb.mode=disabled",
             "model.n_layers=1,2", f"hydra.sweep.dir={tmp_path}"]
    first = run_module("jaxformer.train", "-m", *sweep)
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists())
    assert jobs == ["model.n_layers=1", "model.n_layers=2"]  # readable, from the overrides
    done, interrupted = tmp_path / jobs[0], tmp_path / jobs[1]
    def results(run_dir: Path) -> dict:  # Hydra rewrites its own .hydra/ and train.log
        return {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")
                if path.is_file() and ".hydra" not in path.parts and path.name != "train.log"}

    before = results(done)
    expected = records(interrupted)
    (interrupted / "finished.json").unlink()  # killed after its step-3 checkpoint
    subprocess.run(["rm", "-rf", str(interrupted / "checkpoints" / "6")], check=True)

    again = run_module("jaxformer.train", "-m", *sweep)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{done} already holds a finished run (6 steps): nothing to do" in again.stdout
    assert results(done) == before
    assert records(interrupted) == expected and (interrupted / "finished.json").exists()


# -- security -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, path", [
    ("hydra.launcher._target_=os.system", "hydra.launcher"),
    ("+model._target_=os.system", "model"),
    ("+callback._target_=subprocess.call", "callback"),
])
def test_configs_cannot_instantiate_arbitrary_code(tmp_path, override, path):
    done = run_module("jaxformer.train", override, f"hydra.run.dir={tmp_path}/run")
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert done.stderr.strip() == (
        f"error: {path}._target_={override.split('=', 1)[1]} is not allowed: only classes under "
        "hydra., hydra_plugins., jaxformer., optuna.samplers. may be instantiated")


def test_wandb_api_key_never_reaches_the_run_dir(uninterrupted_run):
    run_dir, done = uninterrupted_run  # trained with WANDB_API_KEY set
    assert SECRET not in done.stdout + done.stderr
    leaks = [path for path in run_dir.rglob("*")
             if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert list((run_dir / "wandb").glob("offline-run-*")) and leaks == []
