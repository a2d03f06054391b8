"""The activation cache, the logit lens and direct logit attribution (jaxformer.inference.lens*)
on tiny models: the cache reproduces the forward, the last lens layer is the logits, the
attributions sum to the target's logit; and the inspect app's lens mode writes its files."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import RUN_CONFIGS, tiny_model_config, write_run
from jaxformer.cli.inspect import FREE_TEXT_KEYS
from jaxformer.errors import UserError
from jaxformer.inference.activation_cache import run_with_cache
from jaxformer.inference.attention_maps import InspectConfig
from jaxformer.inference.lens import (
    LogitLens, direct_logit_attribution, lens_logits, logit_lens,
)
from jaxformer.inference.lens_report import lens_input, lens_run
from jaxformer.models import build_model
from jaxformer.models.instrument import SowConfig
from jaxformer.runs import restore_run

# pre-norm decoders: GPT-2-like (LayerNorm, tied, scanned); Llama-like with a parallel block,
# RMSNorm, an untied head, no biases, unrolled layers and a final logit soft cap
DECODERS = {
    "gpt": RUN_CONFIGS["decoder"],
    "llama_parallel": tiny_model_config(
        "decoder", norm_type="rmsnorm", tie_embeddings=False, bias=False, parallel_block=True,
        scan_layers=False, final_logit_softcap=5.0, mlp="glu", activation="silu"),
}
TOKENS_BT = jnp.asarray([[1, 5, 6, 14, 7, 8, 15], [1, 9, 9, 14, 3, 4, 15]])


def jittered(cfg, seed: int = 0) -> nnx.Module:
    """A model whose parameters (norm gains and shifts included) are far from their init."""
    model = build_model(cfg, seed=seed)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        leaf + 0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
        for leaf, key in zip(leaves, keys)]))
    return model


@pytest.fixture(scope="module", params=list(DECODERS))
def cached(request):
    model = jittered(DECODERS[request.param])
    logits, cache = run_with_cache(model, TOKENS_BT)
    return request.param, model, logits, cache


def test_cache_reproduces_the_forward_by_readable_names(cached):
    name, model, logits, cache = cached
    np.testing.assert_allclose(logits, model(TOKENS_BT), rtol=1e-5, atol=1e-5)
    assert cache.n_layers() == 2
    assert list(cache)[:5] == ["blocks.0.resid_pre", "blocks.0.attn_out", "blocks.0.mlp_out",
                               "blocks.0.resid_post", "blocks.0.attn_pattern"]
    assert cache["blocks.1.attn_pattern"].shape == (2, 2, 7, 7)
    np.testing.assert_allclose(cache["blocks.0.attn_pattern"].sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(np.asarray(cache["blocks.0.attn_pattern"]), k=1) == 0.0)  # causal
    for layer in range(2):
        assert cache[f"blocks.{layer}.resid_pre"].shape == (2, 7, 16)
        block = f"blocks.{layer}"
        parts = cache[f"{block}.attn_out"] + cache[f"{block}.mlp_out"]
        np.testing.assert_allclose(cache[f"{block}.resid_post"], cache[f"{block}.resid_pre"] + parts,
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    np.testing.assert_allclose(model.logits(cache["final_norm_out"]), logits, rtol=1e-5, atol=1e-5)
    names, parts_cbtd = cache.components()
    assert names == ["embed", "blocks.0.attn_out", "blocks.0.mlp_out", "blocks.1.attn_out",
                     "blocks.1.mlp_out"]
    np.testing.assert_allclose(parts_cbtd.sum(0), cache["blocks.1.resid_post"], rtol=1e-4,
                               atol=1e-4)


def test_the_last_lens_layer_is_the_logits(cached):
    _, model, logits, cache = cached
    logits_lbtv = lens_logits(model, cache)
    assert logits_lbtv.shape == (3, 2, 7, model.embed.embedding.shape[0])
    np.testing.assert_allclose(logits_lbtv[-1], logits, rtol=1e-5, atol=1e-5)

    targets_bt = np.concatenate([TOKENS_BT[:, 1:], np.full((2, 1), -1)], axis=1)
    lens = logit_lens(model, cache, targets_bt, k=3)
    assert lens.layers == ["embed", "block 0", "block 1"]
    assert lens.top_ids_lbtk.shape == lens.top_probs_lbtk.shape == (3, 2, 7, 3)
    np.testing.assert_array_equal(lens.top_ids_lbtk[-1, ..., 0], np.argmax(logits, -1))
    probs_btv = jax.nn.softmax(logits, -1)
    expected = np.take_along_axis(np.asarray(probs_btv), np.maximum(targets_bt, 0)[..., None], -1)
    np.testing.assert_allclose(lens.target_probs_lbt[-1, :, :-1], expected[:, :-1, 0], rtol=1e-5)
    assert np.isnan(lens.target_probs_lbt[:, :, -1]).all()
    assert (lens.target_ranks_lbt[..., -1] == 0).all()
    is_top = lens.top_ids_lbtk[..., 0] == targets_bt
    np.testing.assert_array_equal(lens.target_ranks_lbt == 1, is_top)
    assert (lens.target_ranks_lbt[:, :, :-1] >= 1).all()


def test_attributions_sum_to_the_target_logit(cached):
    name, model, logits, cache = cached
    targets_bt = np.asarray(TOKENS_BT[:, ::-1])
    attribution = direct_logit_attribution(model, cache, targets_bt)
    assert attribution.names == ["embed", "blocks.0.attn_out", "blocks.0.mlp_out",
                                 "blocks.1.attn_out", "blocks.1.mlp_out", "bias"]
    assert attribution.contributions_cbt.shape == (6, 2, 7)
    # exact for the frozen-scale linearisation: float rounding only
    np.testing.assert_allclose(attribution.contributions_cbt.sum(0), attribution.logit_bt,
                               rtol=1e-4, atol=1e-4)
    target_logits = np.take_along_axis(np.asarray(logits), targets_bt[..., None], -1)[..., 0]
    cap = DECODERS[name].final_logit_softcap
    capped = attribution.logit_bt if cap is None else cap * np.tanh(attribution.logit_bt / cap)
    np.testing.assert_allclose(capped, target_logits, rtol=1e-4, atol=1e-4)
    if name == "llama_parallel":  # RMSNorm, no biases: no shift
        np.testing.assert_array_equal(attribution.contributions_cbt[-1], 0.0)
    else:
        assert np.abs(attribution.contributions_cbt[-1]).max() > 0.01
    spread = np.abs(attribution.contributions_cbt[:-1]).max(0)
    assert (spread > 0.01).all()  # several parts carry the logit, not the bias alone


def test_default_models_sow_nothing_and_the_cache_leaves_the_model_untouched(cached):
    _, model, _, _ = cached
    assert model.stack.sow_config == SowConfig()
    assert model.stack.blocks.mlp_branch.sow_config == SowConfig()
    model(TOKENS_BT)
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))  # the train step's graph


def test_encoder_decoder_cache_has_both_stacks_and_the_lens_reads_the_decoder():
    model = jittered(RUN_CONFIGS["encoder_decoder"])
    src_bs, tgt_bt = TOKENS_BT, TOKENS_BT[:, :4]
    logits, cache = run_with_cache(model, src_bs, None, tgt_bt)
    np.testing.assert_allclose(logits, model(src_bs, None, tgt_bt), rtol=1e-5, atol=1e-5)
    assert cache.n_layers("encoder") == 2 and cache.n_layers("decoder") == 1
    assert cache["decoder.blocks.0.cross_attn_pattern"].shape == (2, 2, 4, 7)
    np.testing.assert_allclose(
        cache["decoder.blocks.0.resid_post"],
        cache["decoder.blocks.0.resid_pre"] + cache["decoder.blocks.0.attn_out"]
        + cache["decoder.blocks.0.cross_attn_out"] + cache["decoder.blocks.0.mlp_out"],
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.encoder_norm(cache["encoder.blocks.1.resid_post"]),
                               cache["encoder.final_norm_out"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lens_logits(model, cache)[-1], logits, rtol=1e-5, atol=1e-5)
    attribution = direct_logit_attribution(model, cache, np.asarray(tgt_bt))
    assert attribution.names[2] == "decoder.blocks.0.cross_attn_out"
    np.testing.assert_allclose(attribution.contributions_cbt.sum(0), attribution.logit_bt,
                               rtol=1e-4, atol=1e-4)


def test_encoders_cache_but_have_no_lens_and_post_norm_has_no_attribution():
    encoder = build_model(RUN_CONFIGS["encoder"], seed=0)
    hidden, cache = run_with_cache(encoder, TOKENS_BT)
    assert hidden.shape == (2, 7, 16) and "blocks.1.attn_pattern" in cache
    with pytest.raises(UserError, match="Encoder models have none: use a decoder"):
        logit_lens(encoder, cache)

    post = build_model(tiny_model_config("decoder", norm="post"), seed=0)
    _, cache = run_with_cache(post, TOKENS_BT)
    logit_lens(post, cache)  # the lens reads any decoder
    with pytest.raises(UserError, match="model.norm='post'; it needs model.residual=true"):
        direct_logit_attribution(post, cache, np.asarray(TOKENS_BT))


def test_settled_layer_is_where_the_target_stays_on_top():
    ranks_lbt = np.array([[[1, 2, 1, 3]], [[2, 1, 1, 1]], [[1, 1, 1, 2]]])
    lens = LogitLens(["embed", "block 0", "block 1"], np.zeros((3, 1, 4, 1), int),
                     np.zeros((3, 1, 4, 1)), np.zeros((1, 4), int), np.zeros((3, 1, 4)), ranks_lbt)
    np.testing.assert_array_equal(lens.settled_layers(), [[2, 1, 0, -1]])


# -- the inspect app's lens mode ------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for kind in ("decoder", "encoder_decoder"):
        write_run(root / kind, kind)
    return {kind: root / kind for kind in ("decoder", "encoder_decoder")}


def test_lens_app_writes_the_figure_and_tables(runs, tmp_path):
    config = InspectConfig(checkpoint=str(runs["decoder"]), text="12+34=", lens=True,
                           answer="64", out_dir=str(tmp_path))
    paths = lens_run(config)
    assert [p.name for p in paths] == ["logit_lens.png", "logit_lens.md", "logit_lens.csv",
                                       "logit_attribution.csv"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths[1].read_text()
    assert "| 6: `=`→`6` |" in table and "| settles at |" in table and "| **logit** |" in table
    rows = paths[2].read_text().splitlines()
    assert rows[0].startswith("layer,position,input,target,target_prob,target_rank,top1,prob1")
    assert len(rows) == 1 + 3 * 9  # 3 layers x (<bos> 12+34= 64) positions
    assert rows[-1].startswith("block 1,8,4,<eos>,")
    assert len(paths[3].read_text().splitlines()) == 1 + 6 * 9

    run = restore_run(runs["decoder"])
    greedy = lens_input(run.model, run.model_cfg, run.tokenizer, "12+34=")
    assert greedy.input_ids[:7] == [1, *run.tokenizer.encode("12+34=").ids]
    assert greedy.target_ids[-1] == 2 and greedy.answer_start == 6 and not greedy.answer_given


def test_lens_app_reads_an_encoder_decoders_target(runs, tmp_path):
    config = InspectConfig(checkpoint=str(runs["encoder_decoder"]), text="12+34", target="64",
                           lens=True, out_dir=str(tmp_path))
    paths = lens_run(config)
    assert len(paths) == 4
    assert "| 0: `<bos>`→`6` |" in paths[1].read_text()


@pytest.mark.parametrize("fields, message", [
    ({"answer": "64"}, "answer is read by the logit lens: add lens=true"),
    ({"answer": " ", "lens": True}, "answer is empty"),
])
def test_bad_lens_settings_are_one_line_errors(runs, fields, message):
    with pytest.raises(UserError, match=message):
        InspectConfig(checkpoint=str(runs["decoder"]), text="12", **fields)


@pytest.mark.parametrize("kind, fields, message", [
    ("decoder", {"target": "3"}, "target is for encoder_decoder runs"),
    ("encoder_decoder", {"answer": "3"}, "answer is for decoder runs"),
    ("decoder", {"answer": "1" * 5}, "text and answer are 11 tokens with <bos> but model.max_len"),
])
def test_bad_lens_inputs_are_one_line_errors(runs, kind, fields, message):
    run = restore_run(runs[kind])
    with pytest.raises(UserError, match=message):
        lens_input(run.model, run.model_cfg, run.tokenizer, "12+34", **fields)


def test_answer_is_free_text():
    assert "answer" in FREE_TEXT_KEYS
