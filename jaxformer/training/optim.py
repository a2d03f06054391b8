"""The one place the optimizer is built: optax optimizer and learning-rate schedule from
OptimConfig, partitioned by parameter group when fine-tuning freezes or rescales some
(training/finetune.py makes the `FreezePlan` that plugs in here)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
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
    """The learning rate of each step: a linear warmup from 0 to optim.lr over warmup_steps (at
    most total_steps - 1), then optim.schedule: cosine or linear decay to lr * min_lr_ratio at
    total_steps; constant; rsqrt, lr * sqrt(warmup / step) (T5, "Attention is all you need");
    wsd (warmup-stable-decay), constant until the last decay_fraction of the steps, which decay
    linearly to lr * min_lr_ratio."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=end_lr,
        )
    warm = optax.linear_schedule(0.0, cfg.lr, warmup)
    if cfg.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(cfg.lr)], [warmup])
    if cfg.schedule == "linear":
        return optax.join_schedules(
            [warm, optax.linear_schedule(cfg.lr, end_lr, total_steps - warmup)], [warmup])
    if cfg.schedule == "rsqrt":
        # join_schedules counts from the boundary: count c is step warmup + c; without a warmup
        # the decay starts from step 1's lr (lr / sqrt(1 + c))
        start = max(warmup, 1)
        return optax.join_schedules(
            [warm, lambda count: cfg.lr * jnp.sqrt(start / (count + start))], [warmup])
    # wsd: the decay never starts before the warmup ends
    decay_steps = min(max(round(cfg.decay_fraction * total_steps), 1), total_steps - warmup)
    stable_end = total_steps - decay_steps
    return optax.join_schedules(
        [warm, optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, end_lr, decay_steps)], [warmup, stable_end])


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   freeze: GroupPartition | None = None) -> optax.GradientTransformation:
    """optim.name on the schedule, after global-norm clipping: AdamW, Lion or Muon (decoupled
    weight decay, x lr), Adafactor (its factored second moments and update clipping; decoupled
    decay), or SGD with optional (Nesterov) momentum, whose weight decay is added to the gradient
    (L2). Weight decay follows `decay_mask`.

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
    mask = functools.partial(decay_mask, decay_embeddings=cfg.decay_embeddings)
    if cfg.name == "sgd":
        momentum = cfg.momentum or None  # optax: None skips the momentum trace
        optimizer = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=momentum, nesterov=cfg.nesterov),
        )
    elif cfg.name == "adafactor":
        # optax adds adafactor's weight decay after the lr scaling: scaled by the schedule here,
        # so optim.weight_decay means what it means for AdamW (decoupled, x lr)
        decay = (lambda step: cfg.weight_decay * schedule(step)) if cfg.weight_decay else None
        optimizer = optax.adafactor(schedule, momentum=cfg.momentum or None,
                                    weight_decay_rate=decay, weight_decay_mask=mask)
    elif cfg.name == "lion":
        optimizer = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                               mask=mask)
    elif cfg.name == "muon":
        optimizer = _muon(cfg, schedule, mask)
    else:
        optimizer = _adamw(cfg, schedule, mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optimizer)
    return optimizer


def _adamw(cfg: OptimConfig, schedule: optax.Schedule, mask) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=mask)


# a block kernel, stacked (n_layers, d_in, d_out): each layer's (d_in, d_out) is one matrix
STACKED_MATRIX = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
MUON, ADAMW = "muon", "adamw"


def _muon(cfg: OptimConfig, schedule: optax.Schedule, mask) -> optax.GradientTransformation:
    """Muon on the matrices of the transformer blocks, AdamW on everything else (embeddings,
    heads, input layers, biases, norm scales), on one schedule: consistent_rms=0.2 scales Muon's
    updates to AdamW's RMS (Liu et al. 2025, "Muon is scalable"), so one lr and weight decay fit
    both. optax's own split sends only 2-D leaves to Muon and decays every AdamW leaf; this one
    reads the layer axis and keeps the decay mask."""
    muon = optax.contrib.muon(
        schedule, beta=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        consistent_rms=0.2,
        # its share of the tree holds only block kernels (the other leaves are masked out)
        muon_weight_dimension_numbers=lambda params: jax.tree.map(lambda _: STACKED_MATRIX, params),
    )
    return optax.multi_transform({MUON: muon, ADAMW: _adamw(cfg, schedule, mask)}, muon_labels)


def muon_labels(params):
    """MUON for the kernels of the layer stacks (3-D: layer, d_in, d_out), ADAMW for the rest."""
    def label(path, leaf) -> str:
        names = _names(path)
        return MUON if names[-1] == "kernel" and "blocks" in names and leaf.ndim == 3 else ADAMW
    return jax.tree_util.tree_map_with_path(label, params)


NO_DECAY = ("bias", "scale")
EMBEDDING = "embedding"  # token table, learned positions, token types


def decay_mask(params, decay_embeddings: bool = True):
    """Weight decay on weight matrices and (unless decay_embeddings is false) embeddings; biases
    and norm scales are left alone.

    Decided by name, not rank: stacked layers give biases a leading layer axis."""
    skip = NO_DECAY if decay_embeddings else (*NO_DECAY, EMBEDDING)

    def decays(path, _) -> bool:
        return _names(path)[-1] not in skip
    return jax.tree_util.tree_map_with_path(decays, params)


def _names(path) -> list[str]:
    return [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
