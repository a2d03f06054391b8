"""End-to-end training: loss falls, resume is exact, bad runs fail clearly, the CLI works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import replace, run_module, tiny_config
from jaxformer.errors import UserError
from jaxformer.runs import TIMING_KEYS
from jaxformer.training.loop import train


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_loss_decreases_on_a_tiny_run(tmp_path):
    config = replace(tiny_config(steps=40, eval_every=40, checkpoint_every=40), optim={"lr": 3e-3})
    result = train(config, tmp_path)
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert len(losses) == 40 and losses[-1] < 0.7 * losses[0]
    assert result.step == 40 and 0.0 <= result.eval_metrics["exact_match"] <= 1.0
    assert {"step", "split", "loss", "tokens_per_s", "lr"} <= set(records(tmp_path, "train")[0])
    assert records(tmp_path, "eval")[-1]["step"] == 40
    assert (tmp_path / "tokenizer.json").exists()


def test_resume_continues_the_step_count_and_is_exact(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny_config(), straight)
    train(tiny_config(), interrupted)
    # simulate a crash after the step-3 checkpoint: drop the final one, then rerun the same command
    shutil.rmtree(interrupted / "checkpoints" / "6")
    result = train(tiny_config(), interrupted)
    assert result.step == 6
    steps = [r["step"] for r in records(interrupted, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4, records past the checkpoint replaced
    assert records(interrupted, "train") == [
        {**r, **{key: s[key] for key in TIMING_KEYS}}
        for r, s in zip(records(straight, "train"), records(interrupted, "train"))
    ]
    assert records(interrupted, "eval")[-1] == records(straight, "eval")[-1]


def test_finished_run_resumes_without_training(tmp_path):
    train(tiny_config(), tmp_path)
    result = train(tiny_config(), tmp_path)
    assert result.step == 6 and len(records(tmp_path, "train")) == 6


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tiny_config(steps=3), tmp_path)
    other = replace(tiny_config(steps=6), model={"d_model": 64})
    with pytest.raises(UserError, match=r"written by another model \(model.d_model=32 there, 64 now"):
        train(other, tmp_path)


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not writable"):
        train(tiny_config(), blocker / "run")


def test_model_context_too_short_for_task(tmp_path):
    config = replace(tiny_config(), model={"max_len": 8})
    with pytest.raises(UserError, match="model.max_len=8"):
        train(config, tmp_path)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    config = replace(tiny_config(steps=20, eval_every=100, checkpoint_every=100),
                     optim={"lr": 1e30, "clip_norm": 0.0, "warmup_steps": 0})
    with pytest.raises(FloatingPointError, match="non-finite training step 2 .*its update was not applied"):
        train(config, tmp_path)


TINY_CLI = [
    "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_len=16",
    "task.max_digits=2", "task.eval_size=16", "trainer.batch_size=8", "trainer.eval_batch_size=16",
    "trainer.log_every=1", "trainer.eval_every=2", "trainer.checkpoint_every=2",
    "trainer.progress=false",
]


def test_cli_sweep_trains_logs_and_resumes_with_wandb_offline(tmp_path):
    """One `-m` sweep of two jobs with offline wandb, then one job continued by a plain run of
    the same command with more steps (one sweep serves what a single run and a sweep must show)."""
    sweep = tmp_path / "sweep"
    first = run_module("jaxformer.train", "-m", *TINY_CLI, "trainer.steps=2", "model.n_layers=1,2",
                       f"hydra.sweep.dir={sweep}", "logger.wandb.mode=offline")
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.jsonl"))
    assert len(runs) == 2
    assert all(records(run, "eval") for run in runs)
    assert first.stdout.count("held-out greedy exact match after 2 steps") == 2
    run_dir = runs[1]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / ".hydra" / "config.yaml").exists()
    run_id = (run_dir / "wandb_run_id").read_text()
    second = run_module("jaxformer.train", *TINY_CLI, "trainer.steps=4", "model.n_layers=2",
                        f"hydra.run.dir='{run_dir}'", "logger.wandb.mode=offline")  # '=' in it
    assert second.returncode == 0, second.stderr[-2000:]
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4]
    assert (run_dir / "wandb_run_id").read_text() == run_id  # the same wandb run continues


LLAMA_SWITCHES = {"positions": "rope", "norm_type": "rmsnorm", "final_norm": True, "mlp": "glu",
                  "activation": "silu", "n_kv_heads": 1, "bias": False, "tie_embeddings": False}


@pytest.mark.parametrize(
    "kind, task, objective",
    [("encoder", "is_sorted", "classification"), ("encoder", "reverse", "mlm"),
     ("encoder_decoder", "reverse", "seq2seq"), ("decoder", "sort", "clm"),
     ("llama", "sort", "clm")],
)
def test_every_family_trains_from_the_same_config_tree(tmp_path, kind, task, objective):
    """A 'has a pulse' run per model family and objective: loss falls, eval and checkpoint happen.
    `llama`: the decoder with every step-12 switch of conf/model/llama.yaml."""
    model = ({"kind": "decoder", **LLAMA_SWITCHES} if kind == "llama" else {"kind": kind})
    config = replace(
        tiny_config(steps=30, eval_every=30, checkpoint_every=30, log_every=10),
        model={**model, "max_len": 24}, optim={"lr": 3e-3, "warmup_steps": 5},
        task={"name": task, "max_length": 5, "eval_size": 32},
    )
    result = train(config, tmp_path)
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert result.objective == objective and result.step == 30
    assert losses[-1] < losses[0]
    assert {"loss", "accuracy", "exact_match"} <= set(records(tmp_path, "eval")[-1])
    assert (tmp_path / "checkpoints" / "30").exists()
