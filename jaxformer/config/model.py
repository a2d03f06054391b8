"""`model.*`: the schema of every model family and its switches (conf/model/*.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from jaxformer.config.checks import check_at_least, check_choice, check_positive
from jaxformer.errors import UserError

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "sigmoid", "silu")
POSITIONS = ("sinusoidal", "learned", "rope")
NORMS = ("pre", "post", "none")
DTYPES = ("float32", "bfloat16")
INITS = ("normal", "xavier", "he")
# auto: jax.nn.dot_product_attention chooses (cuDNN's fused kernel on a GPU where it applies, XLA
# otherwise) | xla | cudnn | reference: softmax(Q K^T / sqrt(d)) V spelled out
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "reference")
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("dense", "glu")  # glu: down(act(gate(x)) * up(x)): ReGLU, GEGLU, SwiGLU, GLU (sigmoid)
# model.remat: none | full (save nothing per block) | a policy of jax.checkpoint_policies that
# takes no arguments
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "everything_saveable",
                  "nothing_saveable")
MODEL_KINDS = ("encoder", "decoder", "encoder_decoder", "mlp")
POOLINGS = ("cls", "mean")
# What a ModelConfig field means for a trained model's parameters (field metadata, read by
# checkpoint resume, weight import and finetune.init_from):
RUNTIME = "runtime"  # how the model runs, never what it computes: free to differ on resume/import
COMPUTES = "computes"  # what the parameters compute, not their shapes: a source must match it


def _field(default: Any, role: str) -> Any:
    return field(default=default, metadata={"role": role})


@dataclass
class ModelConfig:
    kind: str = _field("decoder", COMPUTES)  # encoder (BERT-like) | decoder (GPT-like) | encoder_decoder (T5-like) | mlp
    vocab_size: Optional[int] = None  # None: taken from the task's tokenizer
    input_dim: Optional[int] = None  # mlp: features per example; None: taken from the task
    max_len: int = 32  # context window (positions table size)
    d_model: int = 128
    n_heads: int = _field(4, COMPUTES)
    n_layers: int = 2  # blocks per stack (the encoder's, for encoder_decoder; hidden layers, for mlp)
    n_decoder_layers: Optional[int] = None  # encoder_decoder's decoder stack; None: n_layers
    d_ff: int = 512
    activation: str = _field("gelu", COMPUTES)
    positions: str = _field("learned", COMPUTES)
    rope_theta: float = _field(10000.0, COMPUTES)  # compared only when positions=rope
    norm: str = _field("pre", COMPUTES)  # placement: pre | post | none
    norm_type: str = _field("layernorm", COMPUTES)  # layernorm | rmsnorm (every norm of the model)
    residual: bool = _field(True, COMPUTES)
    embed_norm: bool = _field(False, COMPUTES)  # a norm after the embeddings (BERT)
    # a norm after the last block; None: only for pre-LN (compared as use_final_norm)
    final_norm: Optional[bool] = _field(None, COMPUTES)
    bias: bool = _field(True, COMPUTES)  # biases in the attention and MLP projections
    dropout: float = _field(0.0, RUNTIME)
    layer_norm_eps: float = _field(1e-5, COMPUTES)  # epsilon of every norm (LayerNorm or RMSNorm)
    init: str = "normal"  # dense kernels: normal(0.02) | xavier (Glorot uniform) | he (He normal)
    mlp: str = _field("dense", COMPUTES)  # dense | glu (gated: the activation picks ReGLU/GEGLU/SwiGLU)
    # glu: hidden size 2/3 d_ff (to a multiple of 8), so the three matrices hold what two of a
    # dense MLP of d_ff do (Shazeer 2020); false: d_ff itself (pretrained Llama / Qwen3 sizes)
    glu_param_matched: bool = True
    n_kv_heads: Optional[int] = _field(None, COMPUTES)  # grouped-query attention; None: n_heads, 1: multi-query
    head_dim: Optional[int] = _field(None, COMPUTES)  # per head; None: d_model / n_heads
    qk_norm: bool = _field(False, COMPUTES)  # RMSNorm on each head's queries and keys (OLMo 2, Qwen3)
    # Gemma 2 soft caps, cap * tanh(x / cap): on attention scores / on the output logits; None: off
    attn_logit_softcap: Optional[float] = _field(None, COMPUTES)
    final_logit_softcap: Optional[float] = _field(None, COMPUTES)
    tie_embeddings: bool = _field(True, COMPUTES)  # output head = token table (decoder, encoder_decoder)
    parallel_block: bool = _field(False, COMPUTES)  # GPT-J / PaLM: x + attn(n(x)) + mlp(n(x))
    attention: str = _field("auto", RUNTIME)  # auto | xla | cudnn | reference (ATTENTION_IMPLS)
    remat: str = _field("none", RUNTIME)  # per block: none | full | a jax.checkpoint_policies name
    scan_layers: bool = _field(True, RUNTIME)  # lax.scan over stacked layers: compile time flat in depth
    type_vocab_size: int = 0  # encoder token-type (segment) embeddings; 0: none
    num_classes: int = 0  # encoder classification head; 0: none (set from a classification task)
    pooling: str = "cls"  # classification input: cls (first token, tanh pooler) | mean
    dtype: str = _field("float32", RUNTIME)  # compute dtype; parameters stay param_dtype
    param_dtype: str = "float32"

    @classmethod
    def fields_with_role(cls, role: str) -> tuple[str, ...]:
        """The fields marked RUNTIME or COMPUTES."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("role") == role)

    def __post_init__(self) -> None:
        check_choice("model", self, "kind", MODEL_KINDS)
        check_positive("model", self, "max_len", "d_model", "n_heads", "n_layers", "d_ff")
        for name in ("vocab_size", "input_dim", "n_decoder_layers", "n_kv_heads", "head_dim",
                     "attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None:
                check_positive("model", self, name)
        if self.kind != "mlp" and self.head_dim is None and self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                "pick d_model as a multiple of n_heads or set model.head_dim"
            )
        if self.n_heads % self.kv_heads:
            raise UserError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                f"{self.n_kv_heads}: each kv head serves a whole group of query heads"
            )
        if self.kind == "mlp" and (self.residual or self.norm != "none"):
            raise UserError(
                f"model.kind=mlp is a plain MLP (model.residual={self.residual}, "
                f"model.norm={self.norm!r}): set model.residual=false model.norm=none"
            )
        check_choice("model", self, "activation", ACTIVATIONS)
        check_choice("model", self, "positions", POSITIONS)
        check_choice("model", self, "norm", NORMS)
        check_choice("model", self, "norm_type", NORM_TYPES)
        check_choice("model", self, "mlp", MLP_TYPES)
        check_choice("model", self, "init", INITS)
        check_choice("model", self, "attention", ATTENTION_IMPLS)
        check_choice("model", self, "remat", REMAT_POLICIES)
        check_choice("model", self, "pooling", POOLINGS)
        check_choice("model", self, "dtype", DTYPES)
        check_choice("model", self, "param_dtype", DTYPES)
        if self.positions == "rope" and self.head_size % 2:
            raise UserError(
                f"model.positions=rope needs an even head dim, but the head dim is "
                f"{self.head_size}: change d_model, n_heads or head_dim"
            )
        check_positive("model", self, "rope_theta", "layer_norm_eps")
        check_at_least("model", self, "type_vocab_size", "num_classes")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        self._check_component_combinations()

    def _check_component_combinations(self) -> None:
        """Switches that exist but do not combine with this model's others."""
        if self.kind == "mlp" and (self.mlp != "dense" or self.parallel_block):
            raise UserError("model.kind=mlp is a plain MLP: model.mlp=glu and model.parallel_block "
                            "apply to the transformer families")
        if self.parallel_block and (self.norm != "pre" or not self.residual
                                    or self.kind == "encoder_decoder"):
            raise UserError(
                "model.parallel_block=true adds attention and MLP of one pre-norm input to the "
                "residual stream: it needs model.norm=pre and model.residual=true, and the "
                "encoder_decoder (cross-attention between them) has no parallel form"
            )
        if not self.tie_embeddings and self.kind not in ("decoder", "encoder_decoder"):
            raise UserError(f"model.tie_embeddings=false applies to the decoder and encoder_decoder "
                            f"(an output head beside the token table); model.kind={self.kind} "
                            "keeps it tied")
        if self.attention == "cudnn" and (self.dtype != "bfloat16"
                                          or self.attn_logit_softcap is not None):
            raise UserError(
                "model.attention=cudnn (cuDNN's fused kernel) needs model.dtype=bfloat16 and no "
                "model.attn_logit_softcap: use model.attention=auto to fall back where it does "
                "not apply"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: d_ff, or 2/3 of it for a parameter-matched gated MLP."""
        if self.mlp == "glu" and self.glu_param_matched:
            return max(8, round(2 * self.d_ff / 3 / 8) * 8)
        return self.d_ff

    @property
    def use_final_norm(self) -> bool:
        # pre-LN leaves the residual stream unnormalised, so it needs a final norm (GPT-2's ln_f)
        return self.norm == "pre" if self.final_norm is None else self.final_norm
