"""Fine-tuning modes: frozen parameter groups and per-group learning rates, as one optax transform.

Every parameter belongs to one group, decided by the first name on its path:
  embeddings  embed (the token table; the decoder's tied LM head reads it too), embeddings,
              encoder_embeddings, decoder_embeddings (positions, token types, embedding norm)
  blocks      stack, encoder, decoder (the layer stacks) and final_norm, encoder_norm, decoder_norm
  head        classifier, mlm_head, lm_head (an untied output head: model.tie_embeddings=false)

The plan plugs into `training/optim.py:make_optimizer`, the one place the optimizer is built:
`optax.multi_transform` gives each frozen group `optax.set_to_zero()` (no updates and no
optimizer state) and each trainable group its own copy of the optimizer at lr x its multiplier.
The lowest N blocks cannot be split off that way:
a LayerStack keeps its layers stacked on a leading axis, so they are slices of the "blocks" leaves.
Their gradients are zeroed before the optimizer (so those slices' moments stay exactly zero, and
clipping only measures what trains) and their updates after it (so weight decay cannot move them).
Whole frozen groups hold no optimizer state; frozen lower-block slices hold zero-valued moments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxformer.config import PARAM_GROUPS, FinetuneConfig, ModelConfig
from jaxformer.errors import UserError
from jaxformer.models import build_model
from jaxformer.training.optim import FROZEN

log = logging.getLogger(__name__)

GROUP_OF_MODULE = {
    "embed": "embeddings", "embeddings": "embeddings",
    "encoder_embeddings": "embeddings", "decoder_embeddings": "embeddings",
    "stack": "blocks", "encoder": "blocks", "decoder": "blocks",
    "final_norm": "blocks", "encoder_norm": "blocks", "decoder_norm": "blocks",
    "classifier": "head", "mlm_head": "head", "lm_head": "head",
}
STACKED = "blocks"  # a LayerStack's attribute: leaves below it carry a leading layer axis


def path_names(path) -> list[str]:
    return [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]


def param_group(path) -> str:
    names = path_names(path)
    if names[0] not in GROUP_OF_MODULE:
        raise UserError(f"finetune: parameter {'.'.join(names)} is in no parameter group "
                        f"(jaxformer/training/finetune.py GROUP_OF_MODULE): plain training only")
    return GROUP_OF_MODULE[names[0]]


def is_stacked(path) -> bool:
    names = path_names(path)
    return GROUP_OF_MODULE.get(names[0]) == "blocks" and STACKED in names[1:]


@dataclass(frozen=True)
class FreezePlan:
    frozen: tuple[str, ...]  # whole groups
    lower_blocks: int  # layers 0..lower_blocks-1 of every stack
    multipliers: dict[str, float]  # trainable group -> lr factor

    def describe(self) -> str:
        trains = ", ".join(f"{group} (lr x{factor:g})" for group, factor in self.multipliers.items())
        frozen = [*self.frozen, *([f"the lowest {self.lower_blocks} block(s) of every stack "
                                   "(zero-valued moments)"] if self.lower_blocks else [])]
        return (f"training {trains}; frozen: {', '.join(frozen)}"
                + (" (whole groups hold no optimizer state)" if self.frozen else ""))

    def labels(self, params):
        """The partition label of every leaf: FROZEN or its group."""
        def label(path, _):
            group = param_group(path)
            return FROZEN if group in self.frozen else group
        return jax.tree_util.tree_map_with_path(label, params)

    def zero_frozen(self) -> optax.GradientTransformation:
        """Stateless: frozen groups' values -> 0, lower-block slices of stacked leaves -> 0.

        Zeros (not a multiply) for whole groups, so XLA can drop their unused gradients."""
        def keep(path, value):
            if param_group(path) in self.frozen:
                return jnp.zeros_like(value)
            if self.lower_blocks and is_stacked(path):
                trains_l = jnp.arange(value.shape[0]) >= self.lower_blocks
                return jnp.where(trains_l.reshape(-1, *([1] * (value.ndim - 1))), value, 0)
            return value

        def update(updates, state, params=None):
            del params
            return jax.tree_util.tree_map_with_path(keep, updates), state

        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def stack_depths(model_cfg: ModelConfig) -> dict[str, int]:
    if model_cfg.kind == "encoder_decoder":
        return {"model.n_layers": model_cfg.n_layers,
                "model.n_decoder_layers": model_cfg.n_decoder_layers or model_cfg.n_layers}
    return {"model.n_layers": model_cfg.n_layers}


def freeze_plan(cfg: FinetuneConfig, model_cfg: ModelConfig) -> FreezePlan:
    """The groups to freeze and lrs to scale, checked against the model: settings that name no
    parameter, exceed the stack depth, have no effect or leave nothing to train are refused."""
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(model_cfg, 0)), nnx.Param)
    present = {param_group(path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract)}
    frozen = cfg.frozen_groups
    where = f"this {model_cfg.kind}"
    tied = " (its LM head is the token table: the embeddings group)" \
        if model_cfg.kind == "decoder" and "head" not in present else ""
    if cfg.mode == "head_only" and "head" not in present:
        raise UserError(f"finetune.mode=head_only, but {where} has no head parameters{tied}: set "
                        "model.num_classes for a classifier, or freeze groups with finetune.freeze")
    for group in cfg.freeze:
        if group not in present:
            raise UserError(f"finetune.freeze=[{group}] names the {group} group, but {where} has "
                            f"no {group} parameters{tied}: drop it")
    if cfg.freeze_lower_blocks:
        if "blocks" in frozen:
            raise UserError(f"finetune.freeze_lower_blocks={cfg.freeze_lower_blocks} has no "
                            f"effect: every block is frozen already (mode={cfg.mode}, "
                            f"freeze={list(cfg.freeze)})")
        for key, depth in stack_depths(model_cfg).items():
            if cfg.freeze_lower_blocks > depth:
                raise UserError(f"finetune.freeze_lower_blocks={cfg.freeze_lower_blocks} exceeds "
                                f"{key}={depth}: freeze at most {depth}")
    trainable = [g for g in PARAM_GROUPS if g in present and g not in frozen]
    if not trainable:
        raise UserError(f"finetune freezes every parameter group of {where} "
                        f"(mode={cfg.mode}, freeze={list(cfg.freeze)}): nothing would train")
    for group in frozen:
        if getattr(cfg.lr_multipliers, group) != 1.0:
            raise UserError(f"finetune.lr_multipliers.{group}="
                            f"{getattr(cfg.lr_multipliers, group)} scales a frozen group: drop it")
    return FreezePlan(frozen, cfg.freeze_lower_blocks,
                      {g: getattr(cfg.lr_multipliers, g) for g in trainable})


def freeze_plan_for(cfg: FinetuneConfig, model_cfg: ModelConfig) -> FreezePlan | None:
    """The plan `make_optimizer` partitions by, or None for plain training (the optimizer, and
    its checkpoint layout, then stay as they are without fine-tuning)."""
    if not cfg.changes_optimizer:
        return None
    plan = freeze_plan(cfg, model_cfg)
    log.info("finetune: %s", plan.describe())
    return plan
