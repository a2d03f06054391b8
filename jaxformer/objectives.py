"""Objectives: which loss each model family trains with, its forward pass and its metrics.

Every loss returns (scalar loss, metrics) with metrics {"loss", "accuracy", "count"}: accuracy is
next-token (clm, seq2seq), masked-token (mlm) or label (classification, vector_classification)
accuracy, and count the tokens or examples it averages over, so evaluation can pool batches exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

OBJECTIVES = ("clm", "seq2seq", "mlm", "classification", "vector_classification")
Metrics = dict[str, jax.Array]


def objective_for(kind: str, classification_task: bool, num_classes: int = 0) -> str:
    """The objective a model family trains with on a task. A decoder classifies (from its last
    token) only when asked to with model.num_classes > 0; otherwise it generates the label."""
    if kind == "encoder":
        return "classification" if classification_task else "mlm"
    if kind == "decoder" and classification_task and num_classes:
        return "classification"
    return {"decoder": "clm", "encoder_decoder": "seq2seq", "mlp": "vector_classification"}[kind]


def first_argmax(logits_btv: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (ties go to the first index) as a max and a min over the vocabulary:
    on XLA:CPU the (value, index) reduction jnp.argmax lowers to took 74 ms of a bench-small train
    step, these two plain reductions ~35 ms (docs/performance.md)."""
    is_max_btv = logits_btv == logits_btv.max(axis=-1, keepdims=True)
    index_btv = jax.lax.broadcasted_iota(jnp.int32, logits_btv.shape, logits_btv.ndim - 1)
    return jnp.where(is_max_btv, index_btv, logits_btv.shape[-1]).min(axis=-1)


def token_loss(
    logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Cross-entropy of `targets_bt` under `logits_btv`, averaged over the positions `weights_bt` marks."""
    weights_bt = weights_bt.astype(jnp.float32)
    token_nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    count = jnp.maximum(weights_bt.sum(), 1.0)
    loss = (token_nll_bt * weights_bt).sum() / count
    correct_bt = (first_argmax(logits_btv) == targets_bt) * weights_bt
    return loss, {"loss": loss, "accuracy": correct_bt.sum() / count, "count": weights_bt.sum()}


def causal_lm_loss(
    logits_btv: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Next-token cross-entropy: logits at t predict tokens[t + 1], weighted by loss_mask[t + 1].

    `logits_btv` are the model's outputs on `tokens_bt[:, :-1]`.
    """
    return token_loss(logits_btv, tokens_bt[:, 1:], loss_mask_bt[:, 1:])


def classification_loss(logits_bc: jax.Array, labels_b: jax.Array) -> tuple[jax.Array, Metrics]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_bc, labels_b).mean()
    accuracy = (jnp.argmax(logits_bc, axis=-1) == labels_b).mean()
    return loss, {"loss": loss, "accuracy": accuracy, "count": jnp.asarray(labels_b.shape[0], jnp.float32)}


def model_loss(
    model: nnx.Module, batch: dict[str, jax.Array], objective: str, *,
    deterministic: bool = True, rngs: nnx.Rngs | None = None,
) -> tuple[jax.Array, Metrics]:
    """Forward `batch` (in the objective's format, see data/pipeline.py) and score it."""
    kw = {"deterministic": deterministic, "rngs": rngs}
    if objective == "clm":
        tokens_bt = batch["tokens"]
        return causal_lm_loss(model(tokens_bt[:, :-1], **kw), tokens_bt, batch["loss_mask"])
    if objective == "seq2seq":
        tgt_bt = batch["tgt"]
        logits_btv = model(batch["src"], batch["src_valid"], tgt_bt[:, :-1], **kw)
        return causal_lm_loss(logits_btv, tgt_bt, batch["loss_mask"])
    if objective == "mlm":
        hidden_btd = model(batch["inputs"], batch["valid"], **kw)
        return token_loss(model.mlm_logits(hidden_btd), batch["targets"], batch["loss_mask"])
    if objective == "classification":
        hidden_btd = model.hidden(batch["tokens"], batch["valid"], **kw)
        return classification_loss(model.classify(hidden_btd, batch["valid"], **kw), batch["label"])
    if objective == "vector_classification":
        return classification_loss(model(batch["features"], **kw), batch["label"])
    raise ValueError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
