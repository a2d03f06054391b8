"""Model FLOPs of one training example: what MFU divides by the time a step takes.

Counted as PaLM's appendix B counts them (the "model FLOPs" of MFU, not the hardware's): every
weight that takes part in a matmul costs 2 FLOPs per token forward and 4 backward (6 in all),
and attention's scores and weighted sums cost 2 x 2 x keys x (heads x head_dim) per query token
forward (x3 with the backward), halved where causal masking leaves half the keys out. Embedding
lookups, norms, activations and the softmax are not counted; recomputation (remat) is not
either, so MFU does not rise when a step does more work. Every step-12 switch that changes a
matmul's size is counted: grouped-query attention, head_dim, gated MLPs, an untied head.
"""

from __future__ import annotations

from jaxformer.config import ModelConfig

TRAIN_FLOPS_PER_WEIGHT = 6  # forward 2, backward 4 (the input's and the weight's gradients)
TRAIN_ATTENTION_FLOPS = 12  # scores + weighted sum (2 matmuls x 2 FLOPs) x 3 (forward + backward)


def attention_weights(cfg: ModelConfig, *, cross: bool = False) -> tuple[int, int]:
    """(weights applied to each query token, to each key token): q and out on the query side,
    k and v on the key side (the same tokens in self-attention)."""
    d, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    query_side, key_side = 2 * d * q_width, 2 * d * kv_width
    return (query_side, key_side) if cross else (query_side + key_side, 0)


def mlp_weights(cfg: ModelConfig) -> int:
    matrices = 3 if cfg.mlp == "glu" else 2  # gated: gate and up in, down out
    return matrices * cfg.d_model * cfg.mlp_hidden


def attention_flops(cfg: ModelConfig, keys: int, *, causal: bool) -> float:
    """Scores and weighted sums per query token, for one layer, training."""
    flops = TRAIN_ATTENTION_FLOPS * keys * cfg.n_heads * cfg.head_size
    return flops / 2 if causal else flops


def train_flops_per_example(cfg: ModelConfig, positions: int,
                            source_positions: int | None = None) -> float | None:
    """Training FLOPs of one example of `positions` tokens (the decoder's; an encoder-decoder's
    encoder reads `source_positions`). None for models without attention (kind=mlp)."""
    if cfg.kind not in ("decoder", "encoder", "encoder_decoder"):
        return None
    d, vocab, layers = cfg.d_model, cfg.vocab_size or 0, cfg.n_layers
    self_weights = attention_weights(cfg)[0] + mlp_weights(cfg)
    head = d * vocab  # the output layer (a tied table is still a matmul)
    if cfg.kind == "decoder":
        per_token = TRAIN_FLOPS_PER_WEIGHT * (layers * self_weights + head) \
            + layers * attention_flops(cfg, positions, causal=True)
        return per_token * positions
    if cfg.kind == "encoder":  # + the masked-LM transform (d x d) before the head
        per_token = TRAIN_FLOPS_PER_WEIGHT * (layers * self_weights + d * d + head) \
            + layers * attention_flops(cfg, positions, causal=False)
        return per_token * positions
    source = positions if source_positions is None else source_positions
    decoder_layers = cfg.n_decoder_layers or layers
    encoder = TRAIN_FLOPS_PER_WEIGHT * layers * self_weights \
        + layers * attention_flops(cfg, source, causal=False)
    cross_query, cross_key = attention_weights(cfg, cross=True)
    decoder = TRAIN_FLOPS_PER_WEIGHT * (decoder_layers * (self_weights + cross_query) + head) \
        + decoder_layers * (attention_flops(cfg, positions, causal=True)
                            + attention_flops(cfg, source, causal=False))
    cross_keys = TRAIN_FLOPS_PER_WEIGHT * decoder_layers * cross_key  # per source token
    return (encoder + cross_keys) * source + decoder * positions
