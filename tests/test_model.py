"""Decoder shapes, causality, padding and tied output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import build_model
from jaxformer.models.attention import reference_attention

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
    q = k = (x @ w_qk)[None, :, None, :]
    v = (x @ (10 * jnp.eye(2)))[None, :, None, :]
    out, weights = reference_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(weights[0, 0, 0], [0.731, 0.269], atol=1e-3)
    np.testing.assert_allclose(out[0, 0, 0], [7.31, 2.69], atol=1e-2)
    # default scale 1/sqrt(d_k) = 1/sqrt(2): scores 5/sqrt2, 4/sqrt2
    out, weights = reference_attention(q, k, v)
    expected = jax.nn.softmax(jnp.asarray([5.0, 4.0]) / np.sqrt(2))
    np.testing.assert_allclose(weights[0, 0, 0], expected, atol=1e-6)


def test_xla_and_reference_attention_agree():
    cfg_ref = ModelConfig(**{**CFG.__dict__, "attention": "reference"})
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 17, size=(2, 9)))
    np.testing.assert_allclose(
        build_model(CFG, 0)(tokens), build_model(cfg_ref, 0)(tokens), atol=1e-5
    )
