"""Model families: shapes, masks (causal, padding, bidirectional), scan vs unrolled, rope, the
config switches, dtypes, encoder heads, and the optimizer's weight-decay mask."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ACTIVATIONS, INITS, NORMS, POSITIONS, ModelConfig
from jaxformer.errors import UserError
from jaxformer.models import build_model
from jaxformer.models.attention import attention_weights, dot_product_attention
from jaxformer.models.instrument import ATTENTION_WEIGHTS, DIAGNOSTICS, instrument
from jaxformer.models.layers import apply_rope
from jaxformer.objectives.base import first_argmax, token_loss
from jaxformer.training.optim import decay_mask

CFG = ModelConfig(vocab_size=17, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=12)


@pytest.fixture(scope="module", params=["sinusoidal", "learned"])
def model(request):
    return build_model(ModelConfig(**{**CFG.__dict__, "positions": request.param}), seed=0)


def test_logits_shape_and_dtype(model):
    tokens = jnp.zeros((3, 10), jnp.int32)
    logits = model(tokens)
    assert logits.shape == (3, 10, 17) and logits.dtype == jnp.float32


def test_future_tokens_never_change_earlier_logits(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 17, size=(2, 10))
    changed = tokens.copy()
    changed[:, 6:] = rng.integers(0, 17, size=(2, 4))
    a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_padding_mask_hides_padded_keys(model):
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, 17, size=(1, 8)))
    valid = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1]])  # two left-padding positions
    other = tokens.at[0, :2].set(5)
    a = model(tokens, valid_bt=valid)
    b = model(other, valid_bt=valid)
    np.testing.assert_allclose(a[:, 2:], b[:, 2:], atol=1e-5)


def test_output_is_tied_to_embedding(model):
    params = nnx.state(model, nnx.Param)
    shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
    assert shapes.count((17, 32)) == 1  # one table serves input and output
    # and the head reads the table the input reads: whatever it holds, logits = hidden @ table^T
    tied = nnx.clone(model)
    table = jax.random.normal(jax.random.key(0), (17, 32))
    tied.embed.embedding[...] = table
    np.testing.assert_array_equal(tied.embed(jnp.arange(17)), table)
    hidden = jax.random.normal(jax.random.key(1), (2, 5, 32))
    np.testing.assert_allclose(tied.logits(hidden), hidden @ table.T, atol=1e-5)
    assert not np.allclose(model.logits(hidden), tied.logits(hidden))


def test_too_long_sequence_is_a_clear_error(model):
    with pytest.raises(ValueError, match="exceeds model.max_len=12"):
        model(jnp.zeros((1, 13), jnp.int32))


def test_dropout_changes_output_only_when_training():
    model = build_model(ModelConfig(**{**CFG.__dict__, "dropout": 0.5}), seed=0)
    tokens = jnp.ones((1, 6), jnp.int32)
    np.testing.assert_array_equal(model(tokens), model(tokens))
    noisy = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(noisy, model(tokens))


def test_attention_worked_example():
    """'IA'=[1,0], 'avanza'=[0,1], W_Q=W_K=[[2,1],[1,2]], W_V=10 I, unscaled softmax."""
    x = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    w_qk = jnp.asarray([[2.0, 1.0], [1.0, 2.0]])
    q = k = (x @ w_qk)[None, None]  # head-major (batch 1, 1 head, 2 tokens, 2 dims)
    v = (x @ (10 * jnp.eye(2)))[None, None]
    np.testing.assert_allclose(attention_weights(q, k, scale=1.0)[0, 0, 0], [0.731, 0.269],
                               atol=1e-3)
    for implementation in ("reference", "xla"):
        out = dot_product_attention(q, k, v, implementation=implementation, scale=1.0)
        np.testing.assert_allclose(out[0, 0, 0], [7.31, 2.69], atol=1e-2)
    # default scale 1/sqrt(d_k) = 1/sqrt(2): scores 5/sqrt2, 4/sqrt2
    expected = jax.nn.softmax(jnp.asarray([5.0, 4.0]) / np.sqrt(2))
    np.testing.assert_allclose(attention_weights(q, k)[0, 0, 0], expected, atol=1e-6)


def test_xla_and_reference_attention_agree():
    cfg_ref = ModelConfig(**{**CFG.__dict__, "attention": "reference"})
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 17, size=(2, 9)))
    np.testing.assert_allclose(
        build_model(CFG, 0)(tokens), build_model(cfg_ref, 0)(tokens), atol=1e-5
    )


# -- every family ----------------------------------------------------------------------------------
VOCAB, D_MODEL, SRC_LEN, TGT_LEN = CFG.vocab_size, CFG.d_model, 7, 5
FAMILY = dict(vocab_size=VOCAB, d_model=D_MODEL, n_heads=CFG.n_heads, n_layers=2, d_ff=CFG.d_ff,
              max_len=CFG.max_len)  # the decoder tests' sizes: eager init ops compile once for both
KINDS = ("encoder", "decoder", "encoder_decoder")


def family_config(kind: str, **overrides) -> ModelConfig:
    return ModelConfig(kind=kind, **{**FAMILY, **overrides})


def random_tokens(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, VOCAB, size=shape).astype(np.int32)


def run_model(graphdef, state, args):
    return nnx.merge(graphdef, state)(*args)


# jitted once per model config: an eager call would re-trace and recompile the layer scan
apply = jax.jit(run_model, static_argnums=0)


def forward_args(kind: str, tokens_bt, valid_bt=None, src_bs=None, src_valid_bs=None):
    if kind == "encoder_decoder":
        src_bs = random_tokens(9, (tokens_bt.shape[0], SRC_LEN)) if src_bs is None else src_bs
        return jax.tree.map(jnp.asarray, (src_bs, src_valid_bs, tokens_bt))
    return jax.tree.map(jnp.asarray, (tokens_bt, valid_bt))


def forward(model, kind: str, tokens_bt, valid_bt=None, src_bs=None, src_valid_bs=None):
    """Encoder: hidden states; decoder: logits; encoder-decoder: logits for `tokens_bt` as the
    target given `src_bs` (default: a fixed random source)."""
    return apply(*nnx.split(model), forward_args(kind, tokens_bt, valid_bt, src_bs, src_valid_bs))


@pytest.fixture(scope="module")
def families():
    """kind -> {scan_layers: model}; both modes from seed 0, so they hold the same parameters."""
    return {kind: {scan: build_model(family_config(kind, scan_layers=scan), seed=0)
                   for scan in (True, False)} for kind in KINDS}


@pytest.mark.parametrize("kind, shape", [
    ("encoder", (2, TGT_LEN, D_MODEL)), ("decoder", (2, TGT_LEN, VOCAB)),
    ("encoder_decoder", (2, TGT_LEN, VOCAB)),
])
def test_family_output_shapes(families, kind, shape):
    out = forward(families[kind][True], kind, random_tokens(0, (2, TGT_LEN)))
    assert out.shape == shape and out.dtype == jnp.float32


@pytest.mark.parametrize("kind", KINDS)
def test_scan_and_unrolled_stacks_share_params_and_outputs(families, kind):
    scanned, unrolled = families[kind][True], families[kind][False]
    for a, b in zip(jax.tree.leaves(nnx.state(scanned, nnx.Param)),
                    jax.tree.leaves(nnx.state(unrolled, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    tokens = random_tokens(1, (2, TGT_LEN))
    np.testing.assert_allclose(forward(scanned, kind, tokens), forward(unrolled, kind, tokens),
                               atol=1e-5)


def test_encoder_is_bidirectional(families):
    tokens = random_tokens(2, (2, TGT_LEN))
    changed = tokens.copy()
    changed[:, -1] = (tokens[:, -1] + 1 - 5) % (VOCAB - 5) + 5  # another real token
    model = families["encoder"][True]
    a, b = forward(model, "encoder", tokens), forward(model, "encoder", changed)
    assert not np.allclose(a[:, 0], b[:, 0])  # the first position sees the last one


@pytest.mark.parametrize("kind", ["encoder", "encoder_decoder"])
def test_source_padding_is_hidden(families, kind):
    model = families[kind][True]
    src = random_tokens(3, (2, SRC_LEN))
    valid = np.ones((2, SRC_LEN), np.int32)
    valid[:, -2:] = 0  # two right-padding positions
    other = src.copy()
    other[:, -2:] = 5
    if kind == "encoder":
        a, b = forward(model, kind, src, valid), forward(model, kind, other, valid)
        np.testing.assert_allclose(a[:, :-2], b[:, :-2], atol=1e-5)
    else:
        tgt = random_tokens(4, (2, TGT_LEN))
        a = forward(model, kind, tgt, src_bs=src, src_valid_bs=valid)
        b = forward(model, kind, tgt, src_bs=other, src_valid_bs=valid)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_encoder_decoder_is_causal_in_the_target_and_reads_the_source(families):
    model = families["encoder_decoder"][True]
    tgt = random_tokens(5, (2, TGT_LEN))
    changed = tgt.copy()
    changed[:, 3:] = random_tokens(6, (2, TGT_LEN - 3))
    a, b = forward(model, "encoder_decoder", tgt), forward(model, "encoder_decoder", changed)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not np.allclose(a[:, 3:], b[:, 3:])
    other_src = forward(model, "encoder_decoder", tgt, src_bs=random_tokens(7, (2, SRC_LEN)))
    assert not np.allclose(a, other_src)  # the memory really matters, at every position
    assert not np.any(np.all(np.isclose(a, other_src, atol=1e-6), axis=-1))


@pytest.mark.parametrize("kind", ["encoder", "encoder_decoder"])
def test_head_of_the_other_families_reads_the_embedding_table(families, kind):
    model = nnx.clone(families[kind][True])
    table = jax.random.normal(jax.random.key(0), (VOCAB, D_MODEL))
    model.embed.embedding[...] = table
    hidden = jax.random.normal(jax.random.key(1), (2, TGT_LEN, D_MODEL))
    if kind == "encoder":  # BERT's head: a transform, then the table plus a bias
        head = model.mlm_head
        transformed = head.norm(head.activation(head.transform(hidden)))
        np.testing.assert_allclose(model.mlm_logits(hidden), transformed @ table.T + head.bias[...],
                                   atol=1e-5)
    else:
        np.testing.assert_allclose(model.logits(hidden), hidden @ table.T, atol=1e-5)


# XLA's own fusion emitters (conftest.py picks the classic ones, which compile faster): "bit for
# bit" below is about what the compiler users run makes of a program with and without sown outputs.
# With the classic emitters the extra outputs change the encoder-decoder's fusion and its logits
# by 1 ulp.
FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


apply_plain = jax.jit(run_model, static_argnums=0, compiler_options=FUSION_EMITTERS)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FUSION_EMITTERS)
def apply_sown(graphdef, state, args):
    model = nnx.merge(graphdef, state)
    return model(*args), nnx.pop(model, nnx.Intermediate)


@pytest.mark.parametrize("attention", ["xla", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_instrumented_models_compute_the_same_outputs(kind, attention):
    """Captured attention weights and diagnostics probes leave the output bit for bit unchanged,
    and the scanned and unrolled stacks sow the same per-layer values."""
    tokens = random_tokens(15, (2, TGT_LEN))
    outputs, sown = [], []
    for scan in (True, False):
        model = build_model(family_config(kind, attention=attention, scan_layers=scan), seed=0)
        plain = apply_plain(*nnx.split(model), forward_args(kind, tokens))
        for config in (ATTENTION_WEIGHTS, DIAGNOSTICS):
            graphdef, state = nnx.split(instrument(nnx.clone(model), config))
            args = forward_args(kind, tokens)
            out, intermediates = apply_sown(graphdef, state, args)
            np.testing.assert_array_equal(out, plain)
            outputs.append(out)
            sown.append(intermediates)
    np.testing.assert_allclose(outputs[0], outputs[2], atol=1e-5)
    for scanned, unrolled in zip(sown[:2], sown[2:]):
        assert jax.tree.structure(scanned) == jax.tree.structure(unrolled)
        for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    stack = sown[0]["decoder" if kind == "encoder_decoder" else "stack"]["blocks"]
    weights_lbhts = stack["attention"]["attention_weights"].get_value()[-1]
    assert weights_lbhts.shape == (2, 2, CFG.n_heads, TGT_LEN, TGT_LEN)
    np.testing.assert_allclose(weights_lbhts.sum(-1), 1.0, atol=1e-5)
    if kind == "encoder_decoder":
        cross_lbhts = stack["cross_attention"]["attention_weights"].get_value()[-1]
        assert cross_lbhts.shape == (2, 2, CFG.n_heads, TGT_LEN, SRC_LEN)


# -- rope ------------------------------------------------------------------------------------------
def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(8)
    q_bthd, k_bthd = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(2))
    positions_bt = jnp.arange(6)[None]

    def scores(offset: int) -> jax.Array:
        q = apply_rope(q_bthd, positions_bt + offset, 10000.0)
        k = apply_rope(k_bthd, positions_bt + offset, 10000.0)
        return jnp.einsum("bthd,bshd->bhts", q, k)

    np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
    unrotated = jnp.einsum("bthd,bshd->bhts", q_bthd, k_bthd)
    assert not np.allclose(scores(0), unrotated, atol=1e-3)  # and the rotation does something


def test_rope_needs_an_even_head_dim():
    with pytest.raises(UserError, match="positions=rope needs an even head dim"):
        family_config("decoder", d_model=36, n_heads=4, positions="rope")  # head dim 9


# -- switches --------------------------------------------------------------------------------------
SWITCHES = ([{"activation": a} for a in ACTIVATIONS] + [{"norm": n} for n in NORMS]
            + [{"residual": False}] + [{"init": i} for i in INITS]
            + [{"positions": p} for p in POSITIONS] + [{"attention": "reference"}, {"bias": False}])


def switch_id(switch: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in switch.items())


@pytest.mark.parametrize("switch", SWITCHES, ids=switch_id)
def test_every_switch_builds_and_runs(switch):
    model = build_model(family_config("decoder", **switch), seed=0)
    logits = forward(model, "decoder", random_tokens(10, (2, TGT_LEN)))
    assert logits.shape == (2, TGT_LEN, VOCAB) and np.all(np.isfinite(logits))


def test_post_and_pre_norm_really_differ():
    # same parameters (no final norm either way), only the placement changes
    pre, post = (build_model(family_config("decoder", norm=norm, final_norm=False), seed=0)
                 for norm in ("pre", "post"))
    for a, b in zip(jax.tree.leaves(nnx.state(pre, nnx.Param)),
                    jax.tree.leaves(nnx.state(post, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    tokens = random_tokens(11, (2, TGT_LEN))
    pre_logits, post_logits = forward(pre, "decoder", tokens), forward(post, "decoder", tokens)
    assert not np.allclose(pre_logits, post_logits, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_runs_with_float32_outputs(kind):
    model = build_model(family_config(kind, dtype="bfloat16"), seed=0)
    out = forward(model, kind, random_tokens(12, (2, TGT_LEN)))
    logits = model.mlm_logits(out) if kind == "encoder" else out
    assert logits.dtype == jnp.float32 and logits.shape == (2, TGT_LEN, VOCAB)
    assert np.all(np.isfinite(logits))


# -- encoder heads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_heads(pooling):
    model = build_model(family_config("encoder", num_classes=3, pooling=pooling), seed=0)
    tokens, valid = random_tokens(13, (2, TGT_LEN)), jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    hidden = model(jnp.asarray(tokens), valid)
    assert model.mlm_logits(hidden).shape == (2, TGT_LEN, VOCAB)
    logits = model.classify(hidden, valid)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32


def test_classify_without_a_head_is_a_clear_error(families):
    model = families["encoder"][True]
    hidden = forward(model, "encoder", random_tokens(14, (2, TGT_LEN)))
    with pytest.raises(ValueError, match="no classification head: set model.num_classes > 0"):
        model.classify(hidden)


# -- optimizer -------------------------------------------------------------------------------------
def test_decay_mask_skips_biases_and_scales_of_stacked_layers(families):
    params = nnx.state(families["encoder_decoder"][True], nnx.Param)
    decays = {}
    for path, decay in jax.tree_util.tree_leaves_with_path(decay_mask(params)):
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        decays[tuple(names)] = decay
    assert decays[("embed", "embedding")]
    stacked = {names: decay for names, decay in decays.items() if "blocks" in names}
    assert stacked[("decoder", "blocks", "cross_attention", "query", "kernel")]
    assert stacked[("encoder", "blocks", "mlp", "up", "kernel")]
    assert not stacked[("encoder", "blocks", "mlp", "up", "bias")]
    assert not stacked[("decoder", "blocks", "mlp_branch", "norm", "scale")]
    for names, decay in decays.items():  # and the rule holds everywhere
        assert decay == (names[-1] not in ("bias", "scale")), names


def test_first_argmax_is_argmax_ties_included_and_token_accuracy_uses_it():
    logits = jnp.asarray(np.random.default_rng(0).integers(0, 3, (40, 6, 5)), jnp.float32)
    np.testing.assert_array_equal(first_argmax(logits), jnp.argmax(logits, axis=-1))
    targets = jnp.argmax(logits, axis=-1).at[:, 0].set(-1)  # first position always wrong
    _, metrics = token_loss(logits, targets, jnp.ones(targets.shape))
    assert float(metrics["accuracy"]) == pytest.approx(5 / 6)
