"""Today's ablation axes (step 12): RMSNorm, QK-norm, gated MLPs, grouped-query attention and its
KV cache, soft caps, untied output, parallel blocks, remat, and the attention implementation
switch reaching jax.nn.dot_product_attention."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sampling import ragged_prompts, uncached_greedy

from jaxformer.config import REMAT_POLICIES, ModelConfig
from jaxformer.errors import UserError
from jaxformer.models import build_model, count_params
from jaxformer.models import attention as attention_lib
from jaxformer.models.attention import attention_weights, dot_product_attention
from jaxformer.models.decoding import generate
from jaxformer.parallel import logical_to_spec

VOCAB, MAX_LEN = 17, 16
BASE = ModelConfig(kind="decoder", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                   max_len=MAX_LEN)
# every new switch on at once: the Llama / Qwen3 / Gemma 2 shape of a tiny decoder
MODERN = dataclasses.replace(BASE, norm_type="rmsnorm", qk_norm=True, mlp="glu", activation="silu",
                             n_kv_heads=2, positions="rope", bias=False, tie_embeddings=False)


def tokens(seed: int, shape=(2, 10)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(5, VOCAB, size=shape), jnp.int32)


@nnx.jit
def logits_of(model, tokens_bt):
    return model(tokens_bt)


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    return {".".join(map(str, path)): tuple(var.shape)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def modern():
    return build_model(MODERN, seed=0)


def test_modern_decoder_has_the_llama_parameters(modern):
    shapes = param_shapes(modern)
    head_dim = 32 // 4
    assert shapes["stack.blocks.attention.query.kernel"] == (2, 32, 4 * head_dim)
    assert shapes["stack.blocks.attention.key.kernel"] == (2, 32, 2 * head_dim)  # 2 kv heads
    assert shapes["stack.blocks.attention.query_norm.scale"] == (2, head_dim)
    assert shapes["stack.blocks.mlp.gate.kernel"] == (2, 32, 40)  # 2/3 of 64, to a multiple of 8
    assert shapes["lm_head.kernel"] == (32, VOCAB)
    assert shapes["final_norm.scale"] == (32,) and "final_norm.bias" not in shapes  # rmsnorm
    assert not any(name.endswith(".bias") for name in shapes)
    logits = logits_of(modern, tokens(0))
    assert logits.shape == (2, 10, VOCAB) and np.all(np.isfinite(logits))


def test_rmsnorm_is_x_over_its_rms_times_scale():
    norm = build_model(dataclasses.replace(BASE, norm_type="rmsnorm"), seed=0).final_norm
    norm.scale[...] = jnp.linspace(0.5, 2.0, 32)
    x = jax.random.normal(jax.random.key(0), (3, 32))
    expected = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + BASE.layer_norm_eps) * norm.scale[...]
    np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_parameter_matched_glu_holds_about_the_dense_mlp_parameters():
    dense = count_params(nnx.state(build_model(BASE, seed=0), nnx.Param))
    glu = count_params(nnx.state(build_model(dataclasses.replace(BASE, mlp="glu"), seed=0), nnx.Param))
    assert abs(glu - dense) / dense < 0.03  # the hidden width rounds to a multiple of 8
    text_lm = dataclasses.replace(BASE, mlp="glu", d_model=256, d_ff=1024)  # experiment=text_lm_cpu
    assert abs(3 * text_lm.mlp_hidden - 2 * 1024) / (2 * 1024) < 0.005
    wide = dataclasses.replace(BASE, mlp="glu", glu_param_matched=False)
    assert wide.mlp_hidden == 64 and dataclasses.replace(BASE, mlp="glu").mlp_hidden == 40


def test_glu_multiplies_the_gate_activation_by_the_up_projection():
    mlp = build_model(dataclasses.replace(BASE, mlp="glu", activation="silu"), seed=0).stack._layers()[0].mlp
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    expected = mlp.down(jax.nn.silu(mlp.gate(x)) * mlp.up(x))
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-6)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_grouped_query_attention_paths_agree_with_repeated_kv_heads(cap):
    keys = jax.random.split(jax.random.key(2), 3)
    q_bhtd = jax.random.normal(keys[0], (2, 4, 5, 8))
    k_bksd, v_bksd = (jax.random.normal(key, (2, 2, 5, 8)) for key in keys[1:])
    mask = attention_lib.causal_mask(5)
    # the definition: each kv head repeated for its group of 2 query heads, plain attention
    k_rep, v_rep = (jnp.repeat(a, 2, axis=1) for a in (k_bksd, v_bksd))
    scores = jnp.einsum("bhtd,bhsd->bhts", q_bhtd, k_rep) / np.sqrt(8)
    scores = scores if cap is None else cap * jnp.tanh(scores / cap)
    weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), -1)
    expected = jnp.einsum("bhts,bhsd->bhtd", weights, v_rep)
    np.testing.assert_allclose(attention_weights(q_bhtd, k_bksd, mask, cap=cap), weights, atol=1e-6)
    for implementation in ("auto", "xla", "reference"):
        out = dot_product_attention(q_bhtd, k_bksd, v_bksd, mask, implementation, cap=cap)
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_kv_cache_holds_only_the_kv_heads_and_decodes_as_the_full_forward(modern):
    cache = modern.init_cache(4, 14)
    k = cache.layers[0].self_kv.k
    assert k.shape == (4, 2, 14, 8)  # (batch, kv heads, positions, head dim): half of 4 heads
    full = build_model(dataclasses.replace(MODERN, n_kv_heads=None), seed=0).init_cache(4, 14)
    assert full.layers[0].self_kv.k.nbytes == 2 * k.nbytes
    prompts, lens = ragged_prompts(0, [6, 2, 4, 1], 6)
    done = generate(modern, prompts, lens, max_new_tokens=13, max_total_len=14, stop_tokens=())
    buffer = np.zeros((4, 14), np.int32)
    buffer[:, :6] = prompts
    reference = uncached_greedy(modern, buffer, lens)
    for b, n in enumerate(lens):
        np.testing.assert_array_equal(np.asarray(done.tokens[b, 0, : 14 - n]), reference[b, n:])


def test_cross_attention_caches_the_memory_in_kv_heads():
    """(cached == full-forward decoding of this model: tests/test_sampling.py, rope-gqa)"""
    seq2seq = build_model(dataclasses.replace(MODERN, kind="encoder_decoder"), seed=0)
    src = jnp.asarray(np.random.default_rng(1).integers(5, VOCAB, (3, 7)), jnp.int32)
    cache = seq2seq.init_cache(3, 12, src, jnp.ones((3, 7), jnp.int32))
    assert cache.layers[0].cross_kv.k.shape == (3, 2, 7, 8)  # the memory's 2 kv heads


def test_final_softcap_bounds_the_logits():
    capped = build_model(dataclasses.replace(BASE, final_logit_softcap=0.5), seed=0)
    plain = build_model(BASE, seed=0)
    a, b = logits_of(capped, tokens(3)), logits_of(plain, tokens(3))
    assert float(jnp.abs(a).max()) < 0.5
    np.testing.assert_allclose(a, 0.5 * jnp.tanh(b / 0.5), atol=1e-5)


def test_untied_head_is_its_own_projection():
    model = build_model(dataclasses.replace(BASE, tie_embeddings=False), seed=0)
    hidden = model.hidden(tokens(4))
    np.testing.assert_allclose(model.logits(hidden), hidden @ model.lm_head.kernel[...], atol=1e-5)
    assert not np.allclose(model.logits(hidden), model.embed.attend(hidden), atol=1e-3)


def test_parallel_block_adds_attention_and_mlp_of_one_normed_input():
    model = build_model(dataclasses.replace(BASE, parallel_block=True), seed=0)
    block = model.stack._layers()[0]
    assert block.mlp_branch.norm is None  # one norm per block (GPT-J)
    x = jax.random.normal(jax.random.key(5), (2, 6, 32))
    mask = attention_lib.causal_mask(6)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    normed = block.attention_branch.norm(x)
    expected = x + block.attention(normed, mask=mask, positions_bt=positions)[0] + block.mlp(normed)
    np.testing.assert_allclose(block(x, mask, positions), expected, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_changes_memory_not_gradients(scan_layers):
    batch = tokens(6)

    def grads(policy: str):
        model = build_model(dataclasses.replace(MODERN, remat=policy, scan_layers=scan_layers), 0)
        graphdef, params = nnx.split(model)
        loss = lambda p: (nnx.merge(graphdef, p)(batch) ** 2).mean()  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    reference = grads("none")
    for policy in ("full", "dots_saveable"):
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads(policy))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_remat_policy_exists_in_jax():
    for policy in REMAT_POLICIES[2:]:
        assert callable(getattr(jax.checkpoint_policies, policy))


def test_the_attention_setting_reaches_jax_dot_product_attention(monkeypatch):
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return real(*args, implementation="xla", **kwargs)  # no cuDNN on this machine

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    for setting in ("xla", "cudnn", "auto"):
        dtype = "bfloat16" if setting == "cudnn" else "float32"
        model = build_model(dataclasses.replace(BASE, attention=setting, dtype=dtype), seed=0)
        model(tokens(7))  # eager: traced here, under the spy
    assert seen == ["xla", "cudnn", "xla"]  # one trace of the scanned blocks each; auto on a CPU: XLA
    seen.clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model = build_model(dataclasses.replace(BASE, attention="auto", dtype="bfloat16"), seed=0)
    model(tokens(7))
    assert seen == ["cudnn"]  # auto on a GPU in bfloat16: cuDNN's fused kernel
    seen.clear()
    model = build_model(dataclasses.replace(BASE, attention="auto", attn_logit_softcap=20.0), 0)
    model(tokens(7))
    assert seen == []  # a soft cap takes the reference path


def test_kv_heads_shard_over_the_tensor_axis_only_in_whole_heads():
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 4})
    names = ("embed", "kv_heads")
    assert logical_to_spec(names, (32, 64), mesh, {"kv_heads": 8})[1] == "tensor"
    # 2 kv heads of 32 channels: 64 columns split 4 ways would cut heads, so they stay whole
    assert logical_to_spec(names, (32, 64), mesh, {"kv_heads": 2})[1] is None


@pytest.mark.parametrize("fields, message", [
    ({"n_kv_heads": 3}, "n_heads=4 is not divisible by model.n_kv_heads=3"),
    ({"n_kv_heads": 0}, "n_kv_heads=0 must be a positive number"),
    ({"remat": "sometimes"}, "model.remat='sometimes' is not one of"),
    ({"attn_logit_softcap": 0.0}, "attn_logit_softcap=0.0 must be a positive number"),
    ({"final_logit_softcap": -1.0}, "final_logit_softcap=-1.0 must be a positive number"),
    ({"norm_type": "batchnorm"}, "model.norm_type='batchnorm' is not one of"),
    ({"mlp": "moe"}, "model.mlp='moe' is not one of"),
    ({"parallel_block": True, "norm": "post"}, "parallel_block=true"),
    ({"kind": "encoder", "tie_embeddings": False}, "tie_embeddings=false applies to"),
    ({"attention": "cudnn"}, "model.attention=cudnn"),
    ({"d_model": 30, "head_dim": None}, "not divisible by model.n_heads=4"),
])
def test_bad_component_values_are_one_line_errors(fields, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as info:
        dataclasses.replace(BASE, **fields)
    assert "\n" not in str(info.value)
