"""`jaxformer.sample` and `jaxformer.evaluate` on tiny run dirs: the JSONL records and the summary
agree with each other and with the training eval, evaluation resumes and ignores batching, and
bad input stops with one line."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import run_module
from jaxformer.cli.app import preflight
from jaxformer.cli.evaluate import to_evaluate_config
from jaxformer.cli.sample import to_sample_config
from jaxformer.config import (
    LoggerConfig, ModelConfig, OptimConfig, SamplingConfig, TaskConfig, TrainConfig, WandbConfig, to_dict,
)
from jaxformer.errors import UserError
from jaxformer.data.tasks import build_task
from jaxformer.data.tokenizers import save_tokenizer
from jaxformer.inference.sampling import SampleConfig, sample_run
from jaxformer.inference.test_time import EvaluateConfig, evaluate_run
from jaxformer.inference.selection import selection_metrics
from jaxformer.models import build_model, resolve_model_config
from jaxformer.objectives import OBJECTIVES
from jaxformer.runs import restore_run as restore_params
from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.optim import make_optimizer
from jaxformer.models import split_model
from jaxformer.training.state import create_train_state

TINY = dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16)
RUNS = {
    "decoder": (ModelConfig(kind="decoder", **TINY), TaskConfig(max_digits=2, eval_size=12)),
    "encoder_decoder": (ModelConfig(kind="encoder_decoder", **TINY),
                        TaskConfig(name="reverse", max_length=4, eval_size=8)),
    "encoder": (ModelConfig(kind="encoder", **TINY), TaskConfig(max_digits=2, eval_size=12)),
}


def write_run(run_dir: Path, model_cfg: ModelConfig, task_cfg: TaskConfig) -> None:
    """A run dir as training leaves it (.hydra/config.yaml, tokenizer.json, a checkpoint), with
    the seed-0 parameters: decoding needs a model, not a trained one."""
    task = build_task(task_cfg)
    config = TrainConfig(model=model_cfg, task=task_cfg, name="tiny")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(config), run_dir / ".hydra" / "config.yaml")
    save_tokenizer(task.tokenizer, run_dir / "tokenizer.json")
    resolved = resolve_model_config(model_cfg, task.tokenizer.get_vocab_size())
    params = split_model(build_model(resolved, seed=0))[1]
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=1, save_every=1)
    state = create_train_state(params, make_optimizer(OptimConfig(), total_steps=10), seed=0)
    checkpointer.save(3, state, {}, {"model": to_dict(resolved)}, force=True)
    checkpointer.wait()
    checkpointer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for kind, (model_cfg, task_cfg) in RUNS.items():
        write_run(root / kind, model_cfg, task_cfg)
    return {kind: root / kind for kind in RUNS}


def evaluate_config(run_dir: Path, out_dir: Path, **sampling) -> EvaluateConfig:
    sampling = {"num_samples": 4, "top_k": 5, "batch_size": 4, **sampling}
    return EvaluateConfig(checkpoint=str(run_dir), out_dir=str(out_dir), num_problems=6,
                          sampling=SamplingConfig(**sampling), majority_resamples=50,
                          logger=LoggerConfig(wandb=WandbConfig(mode="disabled")))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def decoder_evaluation(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return out, evaluate_run(evaluate_config(runs["decoder"], out, beam_size=2))


def test_evaluate_records_agree_with_the_summary_and_the_training_eval(runs, decoder_evaluation):
    out, evaluation = decoder_evaluation
    assert evaluation.directory == out / "test_time" / "step3-T1-k5-p1-n4-seed0-beam2-lp0"
    records = read_jsonl(evaluation.directory / "samples.jsonl")
    assert [r["problem"] for r in records] == list(range(6))
    task = build_task(RUNS["decoder"][1])
    data = OBJECTIVES["clm"].eval_set(task)
    assert [r["prompt"] for r in records] == [task.prompt(p) for p in data.problems[:6]]
    for record in records:
        assert {"problem", "prompt", "expected", "difficulty", "greedy", "beam", "samples"} == set(record)
        assert len(record["samples"]) == 4
        for answer in [record["greedy"], record["beam"], *record["samples"]]:
            assert set(answer) == {"answer", "correct", "logprob", "tokens", "eos"}
            assert 1 <= answer["tokens"] <= task.answer_chars + 1 and answer["logprob"] < 0
            assert answer["correct"] == (answer["answer"] == record["expected"])
        # beam search (2 beams, plain log-prob) never ranks below greedy's own score
        assert record["beam"]["logprob"] >= record["greedy"]["logprob"] - 1e-5
    model = restore_params(runs["decoder"]).model
    greedy = OBJECTIVES["clm"].greedy_answers(model, data, task, batch_size=8)[:6]
    assert [r["greedy"]["answer"] for r in records] == greedy
    summary = json.loads((evaluation.directory / "summary.json").read_text())
    assert summary == evaluation.summary and summary["problems"] == 6
    samples = [r["samples"] for r in records]
    expected = selection_metrics([[s["correct"] for s in row] for row in samples],
                                 [[s["logprob"] for s in row] for row in samples],
                                 [[s["answer"] for s in row] for row in samples],
                                 [0.0, 0.01, 0.05], resamples=50, seed=0)
    assert {key: summary[key] for key in expected} == expected
    logged = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "test_time"]
    assert len(logged) == 1 and logged[0]["step"] == 3 and logged[0]["pass@4"] == summary["pass@4"]


def test_evaluate_resumes_and_does_not_depend_on_the_batch(runs, decoder_evaluation, tmp_path):
    out, evaluation = decoder_evaluation
    path = evaluation.directory / "samples.jsonl"
    complete = path.read_text()
    lines = complete.splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:25])  # interrupted while writing problem 2
    resumed = evaluate_run(evaluate_config(runs["decoder"], out, beam_size=2))
    assert path.read_text() == complete and resumed.summary == evaluation.summary
    assert len([r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "test_time"]) == 1
    other = evaluate_run(evaluate_config(runs["decoder"], tmp_path, beam_size=2, batch_size=6))
    assert (other.directory / "samples.jsonl").read_text() == complete


def test_evaluate_an_encoder_decoder_run(runs, tmp_path):
    evaluation = evaluate_run(evaluate_config(runs["encoder_decoder"], tmp_path, temperature=0.5))
    records = read_jsonl(evaluation.directory / "samples.jsonl")
    task = build_task(RUNS["encoder_decoder"][1])
    model = restore_params(runs["encoder_decoder"]).model
    seq2seq = OBJECTIVES["seq2seq"]
    greedy = seq2seq.greedy_answers(model, seq2seq.eval_set(task), task, batch_size=8)
    assert [r["greedy"]["answer"] for r in records] == greedy[:6]
    assert 0.0 <= evaluation.summary["majority@4"] <= evaluation.summary["pass@4"] <= 1.0


@pytest.mark.parametrize("kind, prompt", [("decoder", "12+34="), ("encoder_decoder", "3141=")])
def test_sample_run_returns_seeded_samples(runs, kind, prompt):
    config = SampleConfig(checkpoint=str(runs[kind]), prompt=prompt,
                          sampling=SamplingConfig(num_samples=3, temperature=0.8, top_p=0.9))
    sampled = sample_run(config)
    assert sampled.kind == kind and sampled.step == 3 and len(sampled.texts) == 3
    assert sampled == sample_run(config)  # seeded
    assert all(lp < 0 for lp in sampled.logprobs) and all(n >= 1 for n in sampled.lengths)
    if kind == "decoder":
        beams = sample_run(dataclasses.replace(config, sampling=SamplingConfig(beam_size=2)),
                           beams=True)
        assert len(beams.texts) == 2 and beams.logprobs[0] >= beams.logprobs[1]


# -- bad input -------------------------------------------------------------------------------------
def preflight_error(capsys, app: str, validate, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        preflight(list(argv), app, validate)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize("override, message", [
    ("sampling.temperature=-1", "sampling.temperature=-1.0 must be >= 0"),
    ("sampling.top_p=0", r"sampling.top_p=0.0 must be in \(0, 1\]"),
    ("sampling.top_p=1.5", r"sampling.top_p=1.5 must be in \(0, 1\]"),
    ("sampling.top_k=-3", "sampling.top_k=-3 must be >= 0"),
    ("sampling.num_samples=0", "sampling.num_samples=0 must be >= 1"),
    ("prompt=''", "prompt is empty"),
    ("checkpoint=/no/such/run", "checkpoint=/no/such/run does not exist"),
])
def test_bad_sample_overrides_are_one_line(runs, capsys, override, message):
    argv = [f"checkpoint={runs['decoder']}", "prompt='1+2='", override]
    assert re.match(f"error: {message}", preflight_error(capsys, "sample", to_sample_config, *argv))


def test_bad_evaluate_overrides_are_one_line(runs, capsys):
    line = preflight_error(capsys, "evaluate", to_evaluate_config,
                           f"checkpoint={runs['decoder']}", "verifier_eps=[0.1,2]")
    assert line == "error: verifier_eps holds 2.0: a false-positive rate is in [0, 1]"
    line = preflight_error(capsys, "evaluate", to_evaluate_config, "sampling.top_k=2")
    assert line == "error: checkpoint is required: python -m jaxformer.evaluate checkpoint=RUN_DIR"


@pytest.mark.parametrize("kind, prompt, sampling, message", [
    ("decoder", "12x34=", {}, r"prompt='12x34=' has characters outside the tokenizer's "
                              r"vocabulary \('x'\): use only '0123456789\+='"),
    ("decoder", "1+2=", {"top_k": 100}, "sampling.top_k=100 exceeds the model's vocabulary of 17"),
    ("decoder", "1+2=", {"max_new_tokens": 13}, "the prompt takes 5 of model.max_len=16 positions"),
    ("encoder", "1+2=", {}, "checkpoint=.* holds an encoder model, which cannot generate text"),
])
def test_bad_sample_requests_name_the_problem(runs, kind, prompt, sampling, message):
    config = SampleConfig(checkpoint=str(runs[kind]), prompt=prompt,
                          sampling=SamplingConfig(**sampling))
    with pytest.raises(UserError, match=message):
        sample_run(config)


@pytest.mark.parametrize("kind, fields, message", [
    ("encoder", {}, "holds an encoder model, which cannot generate text: evaluate needs"),
    ("decoder", {"num_problems": 50}, "num_problems=50 exceeds the run's 12 held-out problems"),
])
def test_bad_evaluate_requests_name_the_problem(runs, tmp_path, kind, fields, message):
    config = dataclasses.replace(evaluate_config(runs[kind], tmp_path), **fields)
    with pytest.raises(UserError, match=message):
        evaluate_run(config)


# -- the commands ----------------------------------------------------------------------------------
def test_cli_sample_prints_samples_with_logprobs(runs):
    done = run_module("jaxformer.sample", f"checkpoint={runs['decoder']}", "prompt=12+34=",
                      "sampling.temperature=0.8", "sampling.top_p=0.9", "sampling.num_samples=3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "3 samples (temperature 0.8, top_k 0, top_p 0.9, seed 0)" in lines[0]
    assert "prompt '12+34='" in lines[0]
    rows = [re.match(r"\s+(-\d+\.\d{4})\s+(\d+)\s+'(.*)'", line) for line in lines[2:]]
    assert len(rows) == 3 and all(rows)
    failed = run_module("jaxformer.sample", f"checkpoint={runs['encoder']}", "prompt=1+2=")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"error: checkpoint={runs['encoder']} holds an encoder model, which cannot generate "
        "text: sample needs a decoder or encoder_decoder run"]


def test_cli_evaluate_writes_outputs_and_an_offline_wandb_run(runs, tmp_path):
    done = run_module("jaxformer.evaluate", f"checkpoint={runs['encoder_decoder']}",
                      f"out_dir={tmp_path}", "num_problems=3", "sampling.num_samples=2",
                      "logger.wandb.mode=offline")
    assert done.returncode == 0, done.stderr
    (directory,) = (tmp_path / "test_time").iterdir()
    assert directory.name == "step3-T1-k0-p1-n2-seed0"
    assert len((directory / "samples.jsonl").read_text().splitlines()) == 3
    assert list((directory / "wandb").glob("offline-run-*"))
    assert "greedy accuracy" in done.stdout and str(directory / "summary.json") in done.stdout
    # stderr is a pipe, not a terminal: a plain progress line per batch, no bar (its rate field)
    assert "evaluate 3/3 problems, elapsed " in done.stderr and "problem/s" not in done.stderr
