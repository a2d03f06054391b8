"""What a run records about itself: throughput (tokens/s, step time, MFU) in every train record,
model FLOPs, the summary's best and final metrics, and the offline wandb run as its users read
it, with the environment's WANDB_* settings honoured."""

from __future__ import annotations

import pytest
from helpers import replace, run_module, tiny_config
from wandb_offline import read_offline_run

from jaxformer.config import ModelConfig, WandbConfig, lower_is_better
from jaxformer.errors import UserError
from jaxformer.models.flops import train_flops_per_example
from jaxformer.runs import RunDir, metrics_summary
from jaxformer.training.loop import train
from jaxformer.training.throughput import datasheet_peak, device_peak
from jaxformer.training.train_log import StepCost

D, F, V, N, T = 64, 256, 100, 3, 32


def model(**fields) -> ModelConfig:
    return ModelConfig(**{"kind": "decoder", "vocab_size": V, "max_len": T, "d_model": D,
                          "n_heads": 4, "n_layers": N, "d_ff": F, **fields})


# -- model FLOPs ----------------------------------------------------------------------------------
def test_decoder_flops_by_hand():
    """6 x (layers x (4 d^2 + 2 d f) + d V) per token, + 12 x layers x T x d halved (causal)."""
    per_token = 6 * (N * (4 * D * D + 2 * D * F) + D * V) + 12 * N * T * D / 2
    assert train_flops_per_example(model(), T) == per_token * T
    assert train_flops_per_example(model(tie_embeddings=False), T) == per_token * T


def test_flops_follow_the_switches():
    base = train_flops_per_example(model(), T)
    # grouped-query attention: k and v shrink with the kv heads (4 -> 1: 2 d^2 -> d^2 / 2)
    assert base - train_flops_per_example(model(n_kv_heads=1), T) == 6 * N * T * (2 * D * D * 3 / 4)
    # a gated MLP has three matrices of the matched hidden width (2/3 d_ff, rounded to 8)
    glu = model(mlp="glu", activation="silu")
    assert base - train_flops_per_example(glu, T) == 6 * N * T * (2 * D * F - 3 * D * glu.mlp_hidden)
    # a wider head_dim widens q, k, v, out and the attention products
    wide = train_flops_per_example(model(head_dim=32), T)
    assert wide - base == 6 * N * T * 4 * D * (4 * 32 - D) + 6 * N * T * T * (4 * 32 - D)
    assert train_flops_per_example(model(kind="mlp", residual=False, norm="none"), T) is None


def test_encoder_decoder_flops_count_both_sides():
    """Equal source and target lengths: per target token 6 x (encoder blocks + decoder blocks
    with cross-attention + head) + the attention products (encoder, causal self, cross)."""
    cfg = model(kind="encoder_decoder")
    block = 4 * D * D + 2 * D * F
    per_token = 6 * (N * block + N * (block + 4 * D * D) + D * V) + 12 * N * T * D * (1 + 0.5 + 1)
    assert train_flops_per_example(cfg, T, source_positions=T) == pytest.approx(per_token * T)
    longer_source = train_flops_per_example(cfg, T, source_positions=2 * T)
    assert longer_source > train_flops_per_example(cfg, T, source_positions=T)


def test_step_cost_metrics():
    cost = StepCost(tokens=1000, flops=4e9, peak_flops=1e11)
    assert cost.metrics(steps=10, seconds=2.0) == {
        "tokens_per_s": 5000.0, "step_time_s": 0.2, "mfu": pytest.approx(0.2)}
    assert "mfu" not in StepCost(tokens=1000).metrics(1, 1.0)  # FLOPs unknown: no MFU


def test_peaks():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert datasheet_peak("TPU v5 lite") == 197e12
    assert datasheet_peak("cpu") is None
    assert device_peak(5e10).flops_per_device == 5e10
    measured = device_peak()  # this CPU: a measured matmul
    assert measured.flops > 1e8 and "measured" in measured.source


# -- summary --------------------------------------------------------------------------------------
def test_summary_holds_best_and_final():
    records = [{"step": 1, "split": "train", "loss": 3.0, "tokens_per_s": 10.0},
               {"step": 2, "split": "eval", "loss": 2.0, "exact_match": 0.5, "bpb": 1.5},
               {"step": 2, "split": "diagnostics", "grad_norm": 9.0},
               {"step": 4, "split": "eval", "loss": 2.5, "exact_match": 0.7, "bpb": float("nan")},
               {"step": 4, "split": "train", "loss": 2.2, "tokens_per_s": 12.0}]
    assert metrics_summary(records) == {
        "train/loss": 2.2,  # timings (tokens_per_s, step_time_s, mfu) are not summarised
        "eval/loss": 2.5, "eval/exact_match": 0.7, "eval/bpb": records[3]["bpb"],
        "best/eval/loss": 2.0, "best_step/eval/loss": 2,
        "best/eval/exact_match": 0.7, "best_step/eval/exact_match": 4,
        "best/eval/bpb": 1.5, "best_step/eval/bpb": 2}
    assert lower_is_better("bpb") and not lower_is_better("exact_match_2")


# -- wandb settings: an explicit config value > the environment > the default --------------------
def test_environment_fills_what_the_config_leaves_unset(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert WandbConfig().resolved(tmp_path) == {
        "mode": "offline", "project": "jaxformer", "entity": None, "dir": str(tmp_path)}
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_DIR", "/elsewhere")
    assert WandbConfig().resolved(tmp_path) == {
        "mode": "disabled", "project": "from-env", "entity": "team", "dir": "/elsewhere"}
    explicit = WandbConfig(mode="offline", project="mine", entity="me", dir="here")
    assert explicit.resolved(tmp_path) == {
        "mode": "offline", "project": "mine", "entity": "me", "dir": "here"}
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older spelling of offline
    assert WandbConfig().resolved(tmp_path)["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="WANDB_MODE='sometimes' in the environment"):
        WandbConfig().resolved(tmp_path)
    WandbConfig(mode="disabled").resolved(tmp_path)  # an explicit mode ignores the environment


def test_a_bad_wandb_mode_in_the_environment_is_one_line_before_training(tmp_path):
    done = run_module("jaxformer.train", "trainer.steps=2", f"hydra.run.dir={tmp_path}",
                      env={"WANDB_MODE": "sometimes"})
    assert done.returncode == 2 and not (tmp_path / "checkpoints").exists()
    assert done.stderr.strip() == ("error: WANDB_MODE='sometimes' in the environment is not a "
                                   "wandb mode: use offline, online, disabled, or set "
                                   "logger.wandb.mode")


def test_wandb_mode_disabled_in_the_environment_writes_no_run(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = replace(tiny_config(steps=2, eval_every=2, checkpoint_every=2),
                     logger={"wandb": WandbConfig()})
    result = train(config, tmp_path / "run")
    assert result.wandb_dir is None and not list(tmp_path.rglob("offline-run-*"))


# -- the offline wandb run, read back -------------------------------------------------------------
def test_offline_wandb_run_reads_back_as_metrics_jsonl(monkeypatch, tmp_path):
    """Mode, project and dir from the environment; config, group, name, per-step train and eval
    metrics at metrics.jsonl's steps, summary (best and final), system info."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    config = replace(tiny_config(), logger={"wandb": WandbConfig()})
    run_dir = tmp_path / "run"
    result = train(config, run_dir, job_name="optim.lr=0.001")
    assert str(tmp_path / "wandb-home") in result.wandb_dir

    run = read_offline_run(tmp_path / "wandb-home")
    assert (run["project"], run["group"], run["name"]) == ("env-project", config.name,
                                                           "optim.lr=0.001")
    assert run["id"] == (run_dir / "wandb_run_id").read_text()
    cfg = run["config"]
    assert cfg["model"]["d_model"] == 32 and cfg["optim"]["lr"] == config.optim.lr
    assert cfg["job_name"] == "optim.lr=0.001" and cfg["n_params"] == RunDir(str(run_dir)).n_params
    assert cfg["git_sha"] and cfg["devices"]["platform"] == "cpu"
    assert cfg["throughput"]["model_flops_per_step"] > 0 and cfg["throughput"]["peak_flops"] > 0

    records = RunDir(run_dir).metrics()
    for split in ("train", "eval"):
        expected = {r["step"]: {k: v for k, v in r.items() if k not in ("step", "split")}
                    for r in records if r["split"] == split}
        logged = {row["_step"]: {k[len(split) + 1:]: v for k, v in row.items()
                                 if k.startswith(split + "/")}
                  for row in run["history"] if any(k.startswith(split + "/") for k in row)}
        assert logged == expected, split
    train_records = [r for r in records if r["split"] == "train"]
    assert all(r["mfu"] > 0 and r["step_time_s"] > 0 and r["tokens_per_s"] > 0
               for r in train_records)

    summary = run["summary"]
    evals = [r for r in records if r["split"] == "eval"]
    assert summary["eval/loss"] == evals[-1]["loss"]
    assert summary["best/eval/loss"] == min(r["loss"] for r in evals)
    assert summary["best/eval/exact_match"] == max(r["exact_match"] for r in evals)
    assert summary["train/loss"] == train_records[-1]["loss"]
    assert run["environment"]["python"].startswith("CPython")  # wandb's own system info
