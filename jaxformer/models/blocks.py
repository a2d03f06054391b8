"""Transformer blocks with norm-placement and residual switches, and the layer stack.

A `LayerStack` stores its blocks' parameters stacked on a leading layer axis (one layout for every
depth and mode, so checkpoints and weight conversion never depend on how the stack runs) and runs
them either with `lax.scan` (compile time flat in depth) or unrolled; in both, what the layers sow
(models/instrument.py) comes back stacked the same way. The plain MLP stacks its dense layers the
same way. Decoding runs the same blocks over a KV cache (`LayerStack.decode_fn`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import KVCache, MultiHeadAttention
from jaxformer.models.instrument import SowConfig
from jaxformer.models.layers import MLP, make_norm


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
    """The norm placement (pre | post | none), dropout and optional residual around one branch:
    `x = branch.post(x, fn(branch.pre(x)))`. Without `norm` (the MLP of a parallel block, which
    reads the attention's normed input) it is dropout and residual only."""

    def __init__(self, cfg: ModelConfig, *, norm: bool = True, rngs: nnx.Rngs):
        self.norm = make_norm(cfg, rngs=rngs) if norm else None
        self.dropout = nnx.Dropout(cfg.dropout)
        self.placement = cfg.norm if norm else "none"
        self.residual = cfg.residual
        self.sow_config = SowConfig()  # models/instrument.py

    def pre(self, x_btd: jax.Array) -> jax.Array:
        """The branch's input."""
        return self.norm(x_btd) if self.placement == "pre" else x_btd

    def post(self, x_btd: jax.Array, h_btd: jax.Array, **dropout_kw) -> jax.Array:
        """The block's stream after the branch output `h_btd`."""
        h_btd = self.dropout(h_btd, **dropout_kw)
        self.sow_config.maybe_sow_branch_output(self, h_btd)
        if self.residual:
            h_btd = x_btd + h_btd
        return self.norm(h_btd) if self.placement == "post" else h_btd


class Block(nnx.Module):
    """Self-attention, then cross-attention to `memory_bsd` (decoder of an encoder-decoder only),
    then the MLP; each wrapped in a Sublayer. The self-attention mask decides causal or not.

    A parallel block (model.parallel_block; GPT-J, PaLM) feeds the attention's normed input to the
    MLP too and adds both outputs to the stream: x + attn(norm(x)) + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = False, rngs: nnx.Rngs):
        self.attention = MultiHeadAttention(cfg, rngs=rngs)
        self.attention_branch = Sublayer(cfg, rngs=rngs)
        if cross_attention:
            self.cross_attention = MultiHeadAttention(cfg, cross=True, rngs=rngs)
            self.cross_attention_branch = Sublayer(cfg, rngs=rngs)
        self.has_cross_attention = cross_attention
        self.parallel = cfg.parallel_block
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_branch = Sublayer(cfg, norm=not self.parallel, rngs=rngs)

    def __call__(
        self, x_btd: jax.Array, mask: jax.Array | None, positions_bt: jax.Array,
        memory_bsd: jax.Array | None = None, memory_mask: jax.Array | None = None, *,
        cache: LayerCache | None = None, **dropout_kw,
    ):
        """(B, T, d_model) -> (B, T, d_model); decoding with a `cache`: (x, updated cache)."""
        self_kv, cross_kv = (None, None) if cache is None else cache
        normed_btd = self.attention_branch.pre(x_btd)
        h_btd, self_kv = self.attention(normed_btd, mask=mask, positions_bt=positions_bt,
                                        cache=self_kv)
        mlp_btd = self.mlp(normed_btd) if self.parallel else None
        x_btd = self.attention_branch.post(x_btd, h_btd, **dropout_kw)
        if self.has_cross_attention:
            h_btd, cross_kv = self.cross_attention(self.cross_attention_branch.pre(x_btd),
                                                   memory_bsd, mask=memory_mask, cache=cross_kv)
            x_btd = self.cross_attention_branch.post(x_btd, h_btd, **dropout_kw)
        if mlp_btd is None:
            mlp_btd = self.mlp(self.mlp_branch.pre(x_btd))
        x_btd = self.mlp_branch.post(x_btd, mlp_btd, **dropout_kw)
        return x_btd if cache is None else (x_btd, LayerCache(self_kv, cross_kv))


def remat(run_layer: Callable, policy: str, *, scanned: bool) -> Callable:
    """`run_layer` under jax.checkpoint (model.remat): the backward pass recomputes each block's
    activations instead of storing them, except what the policy saves (full: nothing but the
    block's input; dots_saveable: the matmul outputs; any jax.checkpoint_policies name)."""
    if policy == "none":
        return run_layer
    saveable = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    # inside lax.scan the loop already keeps XLA from merging the recomputation back (JAX's advice)
    return jax.checkpoint(run_layer, policy=saveable, prevent_cse=not scanned)


class LayerStack(nnx.Module):
    """`n_layers` layers (Blocks unless `layer` says otherwise) with parameters stacked on axis 0,
    run by `lax.scan` or unrolled. Arguments after the input reach every layer unchanged (a Block
    takes mask, positions, memory, memory mask).

    Each layer runs as a module merged from its slice of the stacked state; its output passes the
    `sow_config`'s layer-output probe, and what it sowed is stacked back onto `blocks`.
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
        self.sow_config = SowConfig()  # models/instrument.py
        self.remat = cfg.remat
        self.cache_heads = (cfg.kv_heads, cfg.head_size)  # grouped-query: only the kv heads
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(
        self, x_btd: jax.Array, *layer_args: jax.Array | None, deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        graphdef, state = nnx.split(self.blocks)
        # one dropout key per layer
        keys = None if deterministic else jax.random.split(rngs.dropout(), self.n_layers)

        def run_layer(x_btd, layer_xs):
            """One layer on its slice of the stacked state: (output, what it sowed)."""
            layer_state, key = layer_xs
            block = nnx.merge(graphdef, layer_state)
            layer_rngs = None if key is None else nnx.Rngs(dropout=key)
            out_btd = block(x_btd, *layer_args, deterministic=deterministic, rngs=layer_rngs)
            out_btd = self.sow_config.maybe_probe_layer_output(block, out_btd)
            self.sow_config.maybe_sow_residual(block, x_btd, out_btd)
            x_btd = out_btd
            return x_btd, nnx.pop(block, nnx.Intermediate)  # probes (Perturbation) included

        run = self._scanned if self.scan else self._unrolled
        x_btd, sown = run(remat(run_layer, self.remat, scanned=self.scan), x_btd, (state, keys))
        nnx.update(self.blocks, sown)  # (n_layers, ...) at the parameters' paths
        return x_btd

    @staticmethod
    def _scanned(run_layer: Callable, x_btd: jax.Array, layers_xs):
        """`run_layer` by lax.scan over the stacked layers: compile time flat in depth."""
        return jax.lax.scan(run_layer, x_btd, layers_xs)

    def _unrolled(self, run_layer: Callable, x_btd: jax.Array, layers_xs):
        """`run_layer` layer by layer; what they sow is stacked as scan stacks it."""
        sown_l = []
        for i in range(self.n_layers):
            x_btd, sown = run_layer(x_btd, jax.tree.map(lambda leaf: leaf[i], layers_xs))
            sown_l.append(sown)
        return x_btd, jax.tree.map(lambda *leaves: jnp.stack(leaves), *sown_l)

    def _layers(self) -> list[nnx.Module]:
        """The layers one by one (slices of the stacked parameters)."""
        graphdef, state = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], state))
                for i in range(self.n_layers)]

    def decode_fn(self) -> Callable:
        """`run(x_btd, mask, positions_bt, caches, memory_mask=None) -> (x_btd, caches)`: the
        blocks over new tokens at `positions_bt`, each reading and writing its own LayerCache.

        The blocks run unrolled over one cache per layer, updated in place (a layer slice of a
        stacked cache would be copied at every step, about 10x slower per token on CPU), on their
        weights sliced here, once: build it outside a decode loop, where slicing would copy every
        layer's weights at every step. Its compile time grows with depth; training's does not."""
        blocks = self._layers()

        def run(x_btd, mask, positions_bt, caches, memory_mask=None):
            updated = []
            for block, cache in zip(blocks, caches):
                x_btd, cache = block(x_btd, mask, positions_bt, memory_mask=memory_mask,
                                     cache=cache, deterministic=True)
                updated.append(cache)
            return x_btd, tuple(updated)

        return run

    def empty_cache(self, batch: int, width: int,
                    memory_bsd: jax.Array | None = None) -> tuple[LayerCache, ...]:
        """Zero self-attention caches of `width` slots and, with a memory, its cross-attention
        keys/values (computed here once: they do not change while decoding)."""
        def zeros():
            return jnp.zeros((batch, self.cache_heads[0], width, self.cache_heads[1]), self.dtype)

        return tuple(
            LayerCache(KVCache(zeros(), zeros()),
                       None if memory_bsd is None else block.cross_attention.memory_cache(memory_bsd))
            for block in self._layers()
        )
