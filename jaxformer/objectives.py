"""Losses and metrics per objective. Each returns (scalar loss, dict of summed metric parts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def causal_lm_loss(
    logits_btv: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy: logits at t predict tokens[t + 1], weighted by loss_mask[t + 1].

    `logits_btv` are the model's outputs on `tokens_bt[:, :-1]`.
    """
    targets_bt = tokens_bt[:, 1:]
    weights_bt = loss_mask_bt[:, 1:].astype(jnp.float32)
    token_nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    n_tokens = jnp.maximum(weights_bt.sum(), 1.0)
    loss = (token_nll_bt * weights_bt).sum() / n_tokens
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt) * weights_bt
    return loss, {
        "loss": loss,
        "token_accuracy": correct_bt.sum() / n_tokens,
        "tokens": weights_bt.sum(),
    }
