"""Transformer blocks with norm-placement and residual switches, and the layer stack.

A `LayerStack` stores its blocks' parameters stacked on a leading layer axis (one layout for every
depth and mode, so checkpoints and weight conversion never depend on how the stack runs) and runs
them either with `lax.scan` (compile time flat in depth) or unrolled; both record per-layer
diagnostics (models/probes.py). The plain MLP stacks its dense layers the same way. Decoding runs
the same blocks over a KV cache (`LayerStack.cached`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import KVCache, MultiHeadAttention
from jaxformer.models.layers import MLP, make_norm
from jaxformer.models.probes import LayerRecord, output_stats, pop_records


class LayerCache(NamedTuple):
    """One block's decoding cache (arrays head-major: (B, heads, positions, head_dim))."""

    self_kv: KVCache  # W slots: keys/values of the positions decoded so far
    cross_kv: KVCache | None = None  # S slots: the encoder memory's, computed once


class DecodeCache(NamedTuple):
    """What a decode loop carries between steps: one LayerCache per block and, for an
    encoder-decoder, the source padding (B, S). Every array has the batch on axis 0."""

    layers: tuple[LayerCache, ...]
    memory_valid_bs: jax.Array | None = None

    @property
    def width(self) -> int:
        return self.layers[0].self_kv.k.shape[2]

    def select_rows(self, rows: jax.Array) -> DecodeCache:
        """The cache of batch rows `rows` (repeat rows for N samples, reorder them for beams)."""
        return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), self)


class Sublayer(nnx.Module):
    """One residual branch: norm placement (pre | post | none), dropout, optional residual.
    With `has_aux`, `fn` returns (output, aux) and the branch returns (x, aux)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.norm = make_norm(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.placement = cfg.norm
        self.residual = cfg.residual

    def __call__(self, x_btd: jax.Array, fn: Callable, *, has_aux: bool = False, **dropout_kw):
        h_btd = self.norm(x_btd) if self.placement == "pre" else x_btd
        h_btd, aux = fn(h_btd) if has_aux else (fn(h_btd), None)
        h_btd = self.dropout(h_btd, **dropout_kw)
        if self.residual:
            h_btd = x_btd + h_btd
        h_btd = self.norm(h_btd) if self.placement == "post" else h_btd
        return (h_btd, aux) if has_aux else h_btd


class Block(nnx.Module):
    """Self-attention, then cross-attention to `memory_bsd` (decoder of an encoder-decoder only),
    then the MLP; each wrapped in a Sublayer. The self-attention mask decides causal or not.

    With `cache` (decoding), attention reads and writes the cache instead of recomputing keys and
    values (the cross-attention reads the memory's from it), and the call returns (x, cache).
    """

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = False, rngs: nnx.Rngs):
        self.attention = MultiHeadAttention(cfg, rngs=rngs)
        self.attention_branch = Sublayer(cfg, rngs=rngs)
        if cross_attention:
            self.cross_attention = MultiHeadAttention(cfg, rngs=rngs)
            self.cross_attention_branch = Sublayer(cfg, rngs=rngs)
        self.has_cross_attention = cross_attention
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_branch = Sublayer(cfg, rngs=rngs)

    def __call__(
        self, x_btd: jax.Array, mask: jax.Array | None, positions_bt: jax.Array,
        memory_bsd: jax.Array | None = None, memory_mask: jax.Array | None = None, *,
        cache: LayerCache | None = None, **dropout_kw,
    ):
        if cache is None:
            x_btd = self.attention_branch(
                x_btd, lambda h: self.attention(h, mask=mask, positions_bt=positions_bt),
                **dropout_kw)
        else:
            x_btd, self_kv = self.attention_branch(
                x_btd, lambda h: self.attention.cached(h, cache.self_kv, mask=mask,
                                                       positions_bt=positions_bt),
                has_aux=True, **dropout_kw)
            cache = cache._replace(self_kv=self_kv)
        if self.has_cross_attention:
            def cross(h):
                if cache is None:
                    return self.cross_attention(h, memory_bsd, mask=memory_mask)
                return self.cross_attention.cached(h, cache.cross_kv, mask=memory_mask)[0]
            x_btd = self.cross_attention_branch(x_btd, cross, **dropout_kw)
        x_btd = self.mlp_branch(x_btd, self.mlp, **dropout_kw)
        return x_btd if cache is None else (x_btd, cache)


class LayerStack(nnx.Module):
    """`n_layers` layers (Blocks unless `layer` says otherwise) with parameters stacked on axis 0,
    run by `lax.scan` or unrolled. Arguments after the input reach every layer unchanged (a Block
    takes mask, positions, memory, memory mask).

    In diagnose mode (models/probes.py) a zero `probe` (n_layers, *x.shape) is added to the layer
    outputs and `layer_record` holds per-layer statistics as (n_layers,) arrays.

    Decoding (`cached`) always runs the blocks unrolled over one cache array per layer, updated in
    place: a layer slice of a stacked cache would be copied at every step (about 10x slower per
    token on CPU). Its compile time grows with depth; the training step's does not.
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, *, layer: Callable[..., nnx.Module] = Block,
                 rngs: nnx.Rngs, **layer_kwargs):
        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> nnx.Module:
            return layer(cfg, rngs=rngs, **layer_kwargs)

        self.blocks = make_blocks(rngs)
        self.n_layers = n_layers
        self.scan = cfg.scan_layers
        self.diagnose = False
        self.probe = nnx.data(None)  # set by diagnostics (zeros if unset when diagnosing)
        self.cache_heads = (cfg.n_heads, cfg.d_model // cfg.n_heads)
        self.dtype = jnp.dtype(cfg.dtype)

    def layer_blocks(self) -> list[Block]:
        """The blocks one by one (slices of the stacked parameters), for unrolled runs."""
        graphdef, params = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], params))
                for i in range(self.n_layers)]

    def __call__(
        self, x_btd: jax.Array, *layer_args: jax.Array | None, deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        graphdef, params = nnx.split(self.blocks)
        if deterministic:
            keys_l = [None] * self.n_layers
        else:  # one dropout key per layer
            keys_l = jax.random.split(rngs.dropout(), self.n_layers)
        if self.diagnose and self.probe is None:
            self.probe = jnp.zeros((self.n_layers, *x_btd.shape), x_btd.dtype)
        probes_l = self.probe if self.diagnose else [None] * self.n_layers

        def run_block(x_btd, layer_params, key, probe):
            block = nnx.merge(graphdef, layer_params)
            layer_rngs = None if key is None else nnx.Rngs(dropout=key)
            x_btd = block(x_btd, *layer_args, deterministic=deterministic, rngs=layer_rngs)
            if probe is None:
                return x_btd, block, {}
            x_btd = x_btd + probe
            return x_btd, block, {**output_stats(x_btd), **pop_records(block)}

        if self.scan and not self._captures_weights():
            def body(x_btd, layer):
                x_btd, _, record = run_block(x_btd, *layer)
                return x_btd, record

            keys = None if deterministic else keys_l
            probes = self.probe if self.diagnose else None
            x_btd, records = jax.lax.scan(body, x_btd, (params, keys, probes))
        else:
            captured, records_l = [], []
            for i in range(self.n_layers):
                layer_params = jax.tree.map(lambda leaf: leaf[i], params)
                x_btd, block, record = run_block(x_btd, layer_params, keys_l[i], probes_l[i])
                captured.append(nnx.pop(block, nnx.Intermediate))
                records_l.append(record)
            if any(jax.tree.leaves(state) for state in captured):
                self.sow(nnx.Intermediate, "layers", tuple(captured))
            records = jax.tree.map(lambda *leaves: jnp.stack(leaves), *records_l)
        if self.diagnose:
            self.layer_record = LayerRecord(records)
        return x_btd

    def cached(
        self, blocks: list[Block], x_btd: jax.Array, mask: jax.Array, positions_bt: jax.Array,
        cache: tuple[LayerCache, ...], memory_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """`blocks` (this stack's `layer_blocks()`) over new tokens at `positions_bt`, reading and
        writing the layer caches. Take the blocks once, outside a decode loop: slicing the stacked
        parameters inside it would copy every layer's weights at every step."""
        updated = []
        for block, layer_cache in zip(blocks, cache):
            x_btd, layer_cache = block(x_btd, mask, positions_bt, memory_mask=memory_mask,
                                       cache=layer_cache)
            updated.append(layer_cache)
        return x_btd, tuple(updated)

    def empty_cache(self, batch: int, width: int,
                    memory_bsd: jax.Array | None = None) -> tuple[LayerCache, ...]:
        """Zero self-attention caches of `width` slots and, with a memory, its cross-attention
        keys/values (computed here once: they do not change while decoding)."""
        def zeros():
            return jnp.zeros((batch, self.cache_heads[0], width, self.cache_heads[1]), self.dtype)

        return tuple(
            LayerCache(KVCache(zeros(), zeros()),
                       None if memory_bsd is None else block.cross_attention.memory_cache(memory_bsd))
            for block in self.layer_blocks()
        )

    def _captures_weights(self) -> bool:
        return any(
            getattr(module, "capture_weights", False) for _, module in nnx.iter_modules(self.blocks)
        )
