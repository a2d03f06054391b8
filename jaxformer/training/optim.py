"""The one place the optimizer is built: optax optimizer and learning-rate schedule from
OptimConfig, partitioned by parameter group when fine-tuning freezes or rescales some
(training/finetune.py makes the `FreezePlan` that plugs in here)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import optax

from jaxformer.config import OptimConfig

FROZEN = "frozen"  # the partition label of frozen parameter groups


class GroupPartition(Protocol):
    """What fine-tuning decides (training/finetune.py): the partition of the parameters."""

    multipliers: dict[str, float]  # trainable group -> lr factor
    labels: Callable[[Any], Any]  # params -> the same tree of group labels (FROZEN or a group)

    def zero_frozen(self) -> optax.GradientTransformation:
        """Stateless: zeros the values of frozen parameters (and frozen slices of stacked ones)."""


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup]
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   freeze: GroupPartition | None = None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) or SGD with optional (Nesterov) momentum, whose weight decay
    is added to the gradient (L2); both on the same schedule, after global-norm clipping.

    With a freeze plan, `optax.multi_transform` gives each frozen group `set_to_zero()` (no
    updates, no optimizer state) and each trainable group its own copy of the optimizer at lr x
    its multiplier; clipping moves in front of the partition, so it measures the global norm of
    what trains; and frozen slices of stacked layers are zeroed in the gradients (so their
    moments stay exactly zero) and in the updates (so weight decay cannot move them)."""
    if freeze is None:
        return _optimizer(cfg, total_steps)
    per_group = {group: _optimizer(dataclasses.replace(cfg, lr=cfg.lr * factor, clip_norm=0.0),
                                   total_steps)
                 for group, factor in freeze.multipliers.items()}
    clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(
        freeze.zero_frozen(),  # gradients: frozen slices keep zero moments
        *clip,
        optax.multi_transform({FROZEN: optax.set_to_zero(), **per_group}, freeze.labels),
        freeze.zero_frozen(),  # updates: no weight decay on frozen slices
    )


def _optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "sgd":
        momentum = cfg.momentum or None  # optax: None skips the momentum trace
        optimizer = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=momentum, nesterov=cfg.nesterov),
        )
    else:
        optimizer = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optimizer)
    return optimizer


NO_DECAY = ("bias", "scale")


def decay_mask(params):
    """Weight decay on weight matrices and embeddings; biases and norm scales are left alone.

    Decided by name, not rank: stacked layers give biases a leading layer axis."""
    def decays(path, _) -> bool:
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return names[-1] not in NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)
