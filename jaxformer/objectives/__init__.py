"""Objectives: one object per objective (its batches, loss and metrics, greedy answer and
requirements), and the one place that picks an objective for a model and a task.

Nothing outside this package branches on an objective's name. Adding an objective is adding its
file here and its entry in OBJECTIVES (and, if a model family trains with it by default, a line
in `objective_for`).
"""

from __future__ import annotations

from jaxformer.config import ModelConfig
from jaxformer.data.text import TextTask
from jaxformer.errors import UserError
from jaxformer.objectives.base import LOG_Z_SQ, EvalSet, GenerativeObjective, Objective
from jaxformer.objectives.classification import Classification
from jaxformer.objectives.clm import CausalLM
from jaxformer.objectives.mlm import MaskedLM
from jaxformer.objectives.seq2seq import Seq2Seq
from jaxformer.objectives.span_corruption import SpanCorruption
from jaxformer.objectives.text_clm import TextCausalLM
from jaxformer.objectives.text_mlm import TextMaskedLM
from jaxformer.objectives.vector_classification import VectorClassification

OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in (
    CausalLM(), Seq2Seq(), MaskedLM(), Classification(), VectorClassification(), TextCausalLM(),
    TextMaskedLM(), SpanCorruption())}
# what each family trains with on a prepared text corpus (task=text)
TEXT_OBJECTIVES = {"decoder": "text_clm", "encoder": "text_mlm",
                   "encoder_decoder": "span_corruption"}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_for(model_cfg: ModelConfig, task) -> Objective:
    """The objective a model family trains with on a task, checked against both. A decoder
    classifies (from its last token) only when asked to with model.num_classes > 0; otherwise it
    generates the label as text. An encoder classifies a classification task, and learns a
    generative task by masked LM."""
    kind = model_cfg.kind
    if isinstance(task, TextTask):
        if kind not in TEXT_OBJECTIVES:
            raise UserError(f"task=text is language modelling on tokens: model.kind={kind} "
                            f"cannot read them (use {', '.join(TEXT_OBJECTIVES)})")
        objective = OBJECTIVES[TEXT_OBJECTIVES[kind]]
        objective.check(task, model_cfg)
        return objective
    if kind == "decoder" and model_cfg.num_classes and not task.num_classes:
        raise UserError(f"model.num_classes={model_cfg.num_classes} adds a classifier to the "
                        f"decoder, but task {task.cfg.name} is not a classification task: use "
                        "task=is_sorted or model.num_classes=0")
    if kind == "mlp":
        name = "vector_classification"
    elif kind == "encoder_decoder":
        name = "seq2seq"
    elif kind == "encoder":
        name = "classification" if task.num_classes else "mlm"
    else:
        name = "classification" if model_cfg.num_classes else "clm"
    objective = OBJECTIVES[name]
    objective.check(task, model_cfg)
    return objective


def generative_objective(model_cfg: ModelConfig, run: str, app: str,
                         trained_with: str | None = None) -> GenerativeObjective:
    """The objective whose answers a generative family decodes: the one the run trained with
    (`trained_with`, from its checkpoint) or by family (decoder: clm, encoder-decoder: seq2seq);
    `run` and `app` name the checkpoint and the command in the error for the others."""
    if trained_with in OBJECTIVES and OBJECTIVES[trained_with].generative:
        return OBJECTIVES[trained_with]
    name = {"decoder": "clm", "encoder_decoder": "seq2seq"}.get(model_cfg.kind)
    if name is None:
        raise UserError(f"checkpoint={run} holds an {model_cfg.kind} model, which cannot "
                        f"generate text: {app} needs a decoder or encoder_decoder run")
    return OBJECTIVES[name]


__all__ = ["LOG_Z_SQ", "OBJECTIVES", "EvalSet", "GenerativeObjective", "Objective",
           "generative_objective", "get_objective", "objective_for"]
