"""Helpers shared by the test modules and the multi-device scripts (tests/multidevice_*.py):
tiny configs, config surgery, subprocess runs, fake run dirs. Fixtures live in conftest.py;
no test module imports another."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from jaxformer.config import (  # noqa: E402
    FinetuneConfig, LoggerConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig,
    TrainerConfig, WandbConfig, to_dict,
)


# -- configs --------------------------------------------------------------------------------------
def tiny_config(**trainer_overrides) -> TrainConfig:
    trainer = dict(steps=6, batch_size=16, log_every=1, eval_every=3, checkpoint_every=3,
                   eval_batch_size=32, num_samples=2, progress=False)
    trainer.update(trainer_overrides)
    return TrainConfig(
        model=ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=16,
                          positions="learned"),
        task=TaskConfig(max_digits=2, eval_size=32),
        trainer=TrainerConfig(**trainer),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled")),
    )


def replace(config, **sections):
    """`replace(cfg, model={'d_model': 64})`: a copy with some section fields changed."""
    return dataclasses.replace(
        config, **{name: dataclasses.replace(getattr(config, name), **fields)
                   for name, fields in sections.items()}
    )


def compose_train(*overrides: str):
    """conf/train.yaml composed with `overrides`, as Hydra would (not yet typed)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="train", overrides=list(overrides))


# -- processes ------------------------------------------------------------------------------------
def run_module(module: str, *args: str, cwd: Path = REPO, timeout: int = 300,
               env: dict[str, str] | None = None):
    """Run `python -m module args` as a user would (`env`: variables set on top of this
    process's, wandb disabled unless it says otherwise); returns the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def multidevice_env(devices: int) -> dict:
    """This process's environment for a subprocess with `devices` CPU devices (its XLA_FLAGS
    kept: conftest.py's compile settings)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu",
            "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def read_losses(path: Path) -> dict[int, float]:
    """step -> train loss of a run (its run dir, or its metrics.jsonl)."""
    from jaxformer.runs import METRICS, RunDir

    path = Path(path)
    return {r["step"]: r["loss"] for r in RunDir(path.parent if path.name == METRICS else path)
            .metrics("train")}


# -- the runs tests/test_parallel.py compares across meshes (and tests/multidevice_runs.py runs) --
# family -> (model.kind, task)
FAMILIES = {"decoder": ("decoder", "addition"), "encoder": ("encoder", "addition"),
            "encoder_decoder": ("encoder_decoder", "reverse")}
MESHES = {
    "data8": {"data": 8},
    "data4_fsdp2": {"data": 4, "fsdp": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
SHARDED = {"data": 2, "fsdp": 2, "tensor": 2}
# a Llama-style multi-query decoder: its one kv head cannot split over tensor=2, so k/v stay whole
MQA_MODEL = {"norm_type": "rmsnorm", "mlp": "glu", "activation": "silu", "positions": "rope",
             "n_kv_heads": 1, "qk_norm": True, "bias": False, "tie_embeddings": False}


def family_config(family: str, steps: int = 4, mesh: dict | None = None, **trainer):
    """A tiny run of `family`: 2 heads and d_ff 64 split over tensor=2, batch 16 over 8 ways."""
    kind, task = FAMILIES[family]
    # no evaluation: the runs compare training losses, and 8-device eval compiles are costly
    # one checkpoint, at the last step (the resume tests need no other): an 8-device save of
    # replicated arrays costs seconds of slicing on CPU
    cfg = tiny_config(steps=steps, log_every=1, eval_every=0, checkpoint_every=1000,
                      keep_checkpoints=5, num_samples=0, **trainer)
    # a constant learning rate: a 4-step run is then the first 4 steps of a 6-step run
    return replace(cfg, model={"kind": kind}, optim={"schedule": "constant", "warmup_steps": 0},
                   task={"name": task, "max_length": 4, "eval_size": 16},
                   mesh={"data": -1, "fsdp": 1, "tensor": 1, **(mesh or {})})


# -- transfer (tests/test_transfer.py and tests/multidevice_finetune.py) --------------------------
def sort_config(**trainer):
    """A tiny decoder on 2-5 symbol sorting; its tokenizer is is_sorted's too."""
    return replace(tiny_config(**{"steps": 2, "eval_every": 2, "checkpoint_every": 2, **trainer}),
                   model={"max_len": 24}, task={"name": "sort", "max_length": 5, "eval_size": 32})


def finetune(config, **fields):
    return dataclasses.replace(config, finetune=FinetuneConfig(**fields))


def classify(config):
    """The same decoder with a 2-class head on is_sorted (the decoder classification objective)."""
    return replace(config, model={"num_classes": 2}, task={"name": "is_sorted"})


def finetuned_config(source: Path):
    """is_sorted from the pretrained decoder, new head, embeddings and the lowest block frozen
    (also run on 8 devices)."""
    return finetune(classify(sort_config(steps=2)), init_from=str(source), freeze=["embeddings"],
                    freeze_lower_blocks=1)


# -- fake run dirs (tests/test_inspect.py, tests/test_embed.py) -----------------------------------
RUN_ALPHABET = "0123456789+= "
TINY_MODEL = dict(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=10)


def tiny_model_config(kind: str, **overrides) -> ModelConfig:
    from jaxformer.data.tokenizers import char_tokenizer

    vocab_size = char_tokenizer(RUN_ALPHABET).get_vocab_size()
    return ModelConfig(kind=kind, vocab_size=vocab_size, **{**TINY_MODEL, **overrides})


RUN_CONFIGS = {
    "decoder": tiny_model_config("decoder"),
    "encoder": tiny_model_config("encoder"),
    "encoder_decoder": tiny_model_config("encoder_decoder", n_decoder_layers=1),
}


@functools.cache
def initial_params(kind: str):
    from jaxformer.models import build_model, split_model

    return split_model(build_model(RUN_CONFIGS[kind], seed=0))[1]


def write_run(run_dir: Path, kind: str) -> None:
    """A run dir as training leaves it: tokenizer.json and checkpoints. Step 2 (the latest) holds
    the seed-0 parameters, step 1 those plus one, so restoring step 1 is visibly different."""
    import jax

    from jaxformer.data.tokenizers import char_tokenizer, save_tokenizer
    from jaxformer.training.checkpoint import Checkpointer
    from jaxformer.training.optim import make_optimizer
    from jaxformer.training.state import create_train_state

    tokenizer = char_tokenizer(RUN_ALPHABET)
    run_dir.mkdir(parents=True)
    save_tokenizer(tokenizer, run_dir / "tokenizer.json")
    tx = make_optimizer(OptimConfig(), total_steps=10)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=5, save_every=1)
    params = initial_params(kind)
    for step, step_params in ((1, jax.tree.map(lambda x: x + 1.0, params)), (2, params)):
        state = create_train_state(step_params, tx, seed=0)
        checkpointer.save(step, state, {}, {"model": to_dict(RUN_CONFIGS[kind])}, force=True)
    checkpointer.wait()
    checkpointer.close()


# -- a prepared text corpus (tests/test_text.py) ---------------------------------------------------
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


def write_corpus(out_dir: Path, train_docs: list[str], validation_docs: list[str],
                 sentinels: int = 0) -> Path:
    """A prepared corpus (data/shards.py's format, written by its SplitWriter) with a character
    tokenizer (and `sentinels` <extra_id_i> tokens) instead of a trained BPE: fast, and every
    token is one character."""
    from jaxformer.data.shards import FORMAT, MANIFEST, SplitWriter, token_dtype
    from jaxformer.data.tokenizers import EOS_ID, char_tokenizer, save_tokenizer

    tokenizer = char_tokenizer(TEXT_ALPHABET)
    tokenizer.add_special_tokens([f"<extra_id_{i}>" for i in range(sentinels)])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out_dir / "tokenizer.json")
    dtype = token_dtype(tokenizer.get_vocab_size())
    splits = {}
    for split, docs in (("train", train_docs), ("validation", validation_docs)):
        writer = SplitWriter(out_dir, split, dtype, EOS_ID)
        for doc in docs:
            writer.add(tokenizer.encode(doc).ids, len(doc.encode()))
        splits[split] = writer.close()
    manifest = {"format": FORMAT, "dtype": dtype, "eos_id": EOS_ID, "splits": splits,
                "tokenizer": {"file": "tokenizer.json", "vocab_size": tokenizer.get_vocab_size()}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest))
    return out_dir


def load_script(path: Path, module_name: str):
    """A study's script imported by path (experiments/ is no package); its folder joins sys.path
    so sibling scripts import each other."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
