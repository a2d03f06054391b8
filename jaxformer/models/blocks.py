"""Transformer blocks with norm-placement and residual switches, and the layer stack.

A `LayerStack` stores its blocks' parameters stacked on a leading layer axis (one layout for every
depth and mode, so checkpoints and weight conversion never depend on how the stack runs) and runs
them either with `lax.scan` (compile time flat in depth) or unrolled; both record per-layer
diagnostics (models/probes.py). The plain MLP stacks its dense layers the same way.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import MultiHeadAttention
from jaxformer.models.layers import MLP, make_norm
from jaxformer.models.probes import LayerRecord, output_stats, pop_records


class Sublayer(nnx.Module):
    """One residual branch: norm placement (pre | post | none), dropout, optional residual."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.norm = make_norm(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.placement = cfg.norm
        self.residual = cfg.residual

    def __call__(self, x_btd: jax.Array, fn: Callable[[jax.Array], jax.Array], **dropout_kw):
        h_btd = self.norm(x_btd) if self.placement == "pre" else x_btd
        h_btd = self.dropout(fn(h_btd), **dropout_kw)
        if self.residual:
            h_btd = x_btd + h_btd
        return self.norm(h_btd) if self.placement == "post" else h_btd


class Block(nnx.Module):
    """Self-attention, then cross-attention to `memory_bsd` (decoder of an encoder-decoder only),
    then the MLP; each wrapped in a Sublayer. The self-attention mask decides causal or not."""

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
        memory_bsd: jax.Array | None = None, memory_mask: jax.Array | None = None, **dropout_kw,
    ) -> jax.Array:
        x_btd = self.attention_branch(
            x_btd, lambda h: self.attention(h, mask=mask, positions_bt=positions_bt), **dropout_kw
        )
        if self.has_cross_attention:
            x_btd = self.cross_attention_branch(
                x_btd, lambda h: self.cross_attention(h, memory_bsd, mask=memory_mask), **dropout_kw
            )
        return self.mlp_branch(x_btd, self.mlp, **dropout_kw)


class LayerStack(nnx.Module):
    """`n_layers` layers (Blocks unless `layer` says otherwise) with parameters stacked on axis 0,
    run by `lax.scan` or unrolled. Arguments after the input reach every layer unchanged (a Block
    takes mask, positions, memory, memory mask).

    In diagnose mode (models/probes.py) a zero `probe` (n_layers, *x.shape) is added to the layer
    outputs and `layer_record` holds per-layer statistics as (n_layers,) arrays.
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

    def _captures_weights(self) -> bool:
        return any(
            getattr(module, "capture_weights", False) for _, module in nnx.iter_modules(self.blocks)
        )
