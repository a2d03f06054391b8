"""Train-step benchmarks for scripts/bench.py: `train` (jaxformer), `peer` (PyTorch peers), both
on the same shapes, plus the machine's measured matmul peak that MFU is taken against.

Shapes (`--shape`): bench-small (vocab 8192, d_model 256, 4 layers, 4 heads, d_ff 1024, context
256, batch 16) for CPUs; gpt2-124m (vocab 50257, d_model 768, 12 layers, 12 heads, d_ff 3072,
context 1024, batch 8) for accelerators; tiny, for smoke tests. Each family is built in its peer's layout so both sides
compute the same function: decoder = GPT-2 (pre-LN, tanh GELU, learned positions, tied head),
encoder = BERT for masked LM (post-LN, embedding LayerNorm, exact GELU, MLM transform + tied head),
encoder-decoder = torch.nn.Transformer (post-LN, ReLU, final norms) with embeddings and a tied head,
llama = conf/model/llama.yaml's decoder (pre-RMSNorm, SwiGLU, rope, 2 query heads per kv head, no
biases, untied head) against transformers' LlamaForCausalLM of the config jaxformer exports for it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.config import ATTENTION_IMPLS, MeshConfig, ModelConfig, OptimConfig
from jaxformer.models.flops import train_flops_per_example
from jaxformer.parallel import make_mesh
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.training.state import init_train_state, state_layout
from jaxformer.objectives import get_objective
from jaxformer.training.step import make_train_step
from jaxformer.training.throughput import measured_matmul_peak

FAMILIES = ("decoder", "encoder", "encoder_decoder", "llama")
OBJECTIVE = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "seq2seq", "llama": "clm"}


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    context: int
    batch: int


SHAPES = {
    "bench-small": Shape(vocab=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024, context=256,
                         batch=16),
    "gpt2-124m": Shape(vocab=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, context=1024,
                       batch=8),
    "tiny": Shape(vocab=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, context=16, batch=4),
}


def model_config(family: str, shape: Shape, dtype: str = "float32") -> ModelConfig:
    """The jaxformer model that computes what the family's PyTorch peer computes."""
    common = dict(kind="decoder" if family == "llama" else family, vocab_size=shape.vocab,
                  max_len=shape.context, d_model=shape.d_model, n_heads=shape.n_heads,
                  n_layers=shape.n_layers, d_ff=shape.d_ff, dropout=0.0, dtype=dtype,
                  positions="learned")
    layouts = {
        "decoder": dict(activation="gelu_tanh", norm="pre", layer_norm_eps=1e-5),
        "encoder": dict(activation="gelu", norm="post", embed_norm=True, final_norm=False,
                        type_vocab_size=2, layer_norm_eps=1e-12),
        "encoder_decoder": dict(activation="relu", norm="post", final_norm=True,
                                layer_norm_eps=1e-5),
        "llama": dict(positions="rope", norm="pre", norm_type="rmsnorm", final_norm=True,
                      mlp="glu", activation="silu", n_kv_heads=max(1, shape.n_heads // 2),
                      bias=False, tie_embeddings=False, layer_norm_eps=1e-5),
    }
    return ModelConfig(**{**common, **layouts[family]})


# -- FLOPs ----------------------------------------------------------------------------------------
def flops_per_token(family: str, shape: Shape) -> float:
    """Training FLOPs per (target) token, as the training logs count them (models/flops.py):
    an encoder-decoder's source and target are both `context` tokens long."""
    return train_flops_per_example(model_config(family, shape), shape.context) / shape.context


def measured_peak_flops() -> float:
    """The ceiling MFU is measured against: the fastest 2048^3 float32 matmul (on an accelerator
    the chip's bf16 peak is the fairer one: pass --peak)."""
    return measured_matmul_peak(n=2048, repeats=10)


# -- batches --------------------------------------------------------------------------------------
def random_batch(family: str, shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch in the objective's format (jaxformer/objectives/) of random tokens."""
    rng = np.random.default_rng(seed)
    b, t, v = shape.batch, shape.context, shape.vocab
    tokens = rng.integers(5, v, (b, t + 1), dtype=np.int32)
    ones = np.ones((b, t + 1), np.float32)
    if OBJECTIVE[family] == "clm":
        return {"tokens": tokens, "loss_mask": ones}
    if family == "encoder":
        masked = (rng.random((b, t)) < 0.15).astype(np.float32)
        inputs = np.where(masked > 0, 4, tokens[:, :t]).astype(np.int32)  # 4 = <mask>
        return {"inputs": inputs, "targets": tokens[:, :t], "loss_mask": masked,
                "valid": ones[:, :t]}
    return {"src": tokens[:, :t], "src_valid": ones[:, :t], "tgt": tokens, "loss_mask": ones}


# -- jaxformer ------------------------------------------------------------------------------------
def time_steps(step: Callable[[], object], steps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    return times


def train_bench(family: str, shape: Shape, steps: int, peak: float, dtype: str = "float32",
                scan_layers: bool = True, profile_dir: str | None = None,
                attention: str = "auto") -> dict:
    """Tokens/s of the jitted train step (forward, backward, AdamW; state donated) after
    compile, median over `steps`; compile time; XLA's memory plan and the process's peak RSS.
    `attention`: model.attention (auto, xla, cudnn, reference)."""
    cfg = dataclasses.replace(model_config(family, shape, dtype), scan_layers=scan_layers,
                              attention=attention)
    optim = OptimConfig(warmup_steps=0)
    tx, schedule = make_optimizer(optim, 10_000), make_schedule(optim, 10_000)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])  # one device
    layout = state_layout(cfg, tx, 0, mesh)
    state = init_train_state(cfg, tx, 0, layout.shardings)
    batch = {k: jnp.asarray(v) for k, v in random_batch(family, shape).items()}
    train_step = make_train_step(layout.graphdef, layout.rest, tx, schedule,
                                 get_objective(OBJECTIVE[family]))

    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    times = time_steps(step, steps)
    tokens = shape.batch * shape.context
    tokens_per_s = tokens / statistics.median(times)
    flops = flops_per_token(family, shape)
    result = {
        "train_tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(1e3 * statistics.median(times), 2),
        "step_ms_min": round(1e3 * min(times), 2),
        "mfu": round(flops * tokens_per_s / peak, 4),
        "flops_per_token": flops, "compile_s": round(compile_s, 2),
        "peak_memory_mb": round(peak_rss_mb(), 1),
        "n_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
    }
    if profile_dir:
        result["profile"] = profile_steps(step, Path(profile_dir))
    if memory is not None:  # XLA's plan: what the step needs beyond its inputs
        result["xla_temp_mb"] = round(memory.temp_size_in_bytes / 2**20, 1)
        result["xla_argument_mb"] = round(memory.argument_size_in_bytes / 2**20, 1)
    device = jax.devices()[0]
    if device.platform != "cpu" and (stats := device.memory_stats()):
        result["peak_memory_mb"] = round(stats.get("peak_bytes_in_use", 0) / 2**20, 1)
    return result


PROFILE_STEPS = 3
# per-op events on CPU need this before the backend starts (train_command sets it)
CPU_OP_TRACING = "--xla_cpu_enable_xprof_traceme=true"


def profile_steps(step: Callable[[], object], profile_dir: Path, top: int = 20) -> dict:
    """A jax.profiler trace of PROFILE_STEPS steps in `profile_dir` (open it in Perfetto or
    XProf) and the `top` XLA ops by time per step. On CPU, matmuls handed to XNNPACK run
    without their own events: `traced_ms_per_step` less than the step is their share."""
    with jax.profiler.trace(str(profile_dir), create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
            jax.block_until_ready(step())
    trace = max(profile_dir.rglob("*.trace.json.gz"), key=os.path.getmtime)
    events = json.loads(gzip.open(trace).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    op_us: collections.Counter = collections.Counter()
    for event in events:  # complete events of XLA ops; not Python frames or executor spans
        name = event.get("name", "")
        if event.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor", "Pjit",
                                                              "Slinky")):
            op_us[name] += event["dur"]
    per_step = {name: round(us / 1e3 / PROFILE_STEPS, 2) for name, us in op_us.most_common(top)}
    return {"trace": str(trace), "traced_ms_per_step": round(sum(op_us.values()) / 1e3
                                                                / PROFILE_STEPS, 1),
            "top_ops_ms_per_step": per_step}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- PyTorch peers --------------------------------------------------------------------------------
def torch_peer(family: str, shape: Shape):
    """(module, loss_fn(batch) -> loss) of the family's PyTorch peer, float32, dropout off."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if family == "decoder":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=shape.vocab, n_positions=shape.context, n_embd=shape.d_model,
            n_layer=shape.n_layers, n_head=shape.n_heads, n_inner=shape.d_ff,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        return model, lambda b: model(input_ids=b["tokens"][:, :-1],
                                      labels=b["tokens"][:, :-1]).loss
    if family == "llama":  # the config jaxformer's own export writes for this model
        from transformers import LlamaConfig, LlamaForCausalLM

        from jaxformer.interop.llama import model_config_to_llama_config

        hf_config = model_config_to_llama_config(model_config(family, shape))
        hf_config.pop("model_type"), hf_config.pop("architectures")
        model = LlamaForCausalLM(LlamaConfig(**hf_config))
        return model, lambda b: model(input_ids=b["tokens"][:, :-1],
                                      labels=b["tokens"][:, :-1]).loss
    if family == "encoder":
        from transformers import BertConfig, BertForMaskedLM

        model = BertForMaskedLM(BertConfig(
            vocab_size=shape.vocab, hidden_size=shape.d_model, num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads, intermediate_size=shape.d_ff,
            max_position_embeddings=shape.context, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        return model, lambda b: model(input_ids=b["inputs"], attention_mask=b["valid"],
                                      labels=torch.where(b["loss_mask"] > 0, b["targets"],
                                                         -100)).loss

    class Seq2Seq(nn.Module):  # nn.Transformer with the embeddings and tied head it lacks
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(shape.vocab, shape.d_model)
            self.src_pos = nn.Embedding(shape.context, shape.d_model)
            self.tgt_pos = nn.Embedding(shape.context, shape.d_model)
            self.transformer = nn.Transformer(
                shape.d_model, shape.n_heads, shape.n_layers, shape.n_layers, shape.d_ff,
                dropout=0.0, batch_first=True)
            self.mask = nn.Transformer.generate_square_subsequent_mask(shape.context)

        def forward(self, src, tgt):
            positions = torch.arange(shape.context)
            hidden = self.transformer(self.embed(src) + self.src_pos(positions),
                                      self.embed(tgt) + self.tgt_pos(positions),
                                      tgt_mask=self.mask, tgt_is_causal=True)
            return hidden @ self.embed.weight.T

    model = Seq2Seq()
    return model, lambda b: nn.functional.cross_entropy(
        model(b["src"], b["tgt"][:, :-1]).flatten(0, 1), b["tgt"][:, 1:].flatten())


def peer_bench(family: str, shape: Shape, steps: int, peak: float) -> dict:
    """Tokens/s of the peer's training step (forward, backward, AdamW) on PyTorch CPU."""
    import torch

    model, loss_fn = torch_peer(family, shape)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
             for k, v in random_batch(family, shape).items()}

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tokens_per_s = shape.batch * shape.context / statistics.median(times)
    return {"peer": type(model).__name__, "peer_tokens_per_s": round(tokens_per_s, 1),
            "peer_step_ms": round(1e3 * statistics.median(times), 2),
            "peer_mfu": round(flops_per_token(family, shape) * tokens_per_s / peak, 4),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


# -- subcommands ----------------------------------------------------------------------------------
def add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-small")
    parser.add_argument("--model", choices=FAMILIES, default="decoder")
    parser.add_argument("--steps", type=int, default=10, help="median of this many steps")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                        help="model.attention: auto takes cuDNN's fused kernel on a GPU where it "
                             "applies")
    parser.add_argument("--peak", type=float, default=None,
                        help="peak FLOP/s for MFU (default: a measured float32 matmul)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the PyTorch peer in the same run")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="also trace a few steps into DIR (jax.profiler) and list the "
                             "slowest XLA ops in the JSON")


def shape_info(args: argparse.Namespace) -> tuple[Shape, float, dict]:
    shape = SHAPES[args.shape]
    peak = args.peak or measured_peak_flops()
    return shape, peak, {"shape": args.shape, **dataclasses.asdict(shape), "model": args.model,
                         "peak_flops": round(peak), "peak": "given" if args.peak else
                         "measured float32 2048^3 matmul", "steps": args.steps}


def train_command(args: argparse.Namespace) -> dict:
    if args.profile:  # JAX has not started a backend yet: XLA still reads its flags
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_OP_TRACING}".strip()
    shape, peak, info = shape_info(args)
    result = {**info, "dtype": args.dtype, "scan_layers": args.scan_layers,
              "attention": args.attention,
              **train_bench(args.model, shape, args.steps, peak, args.dtype, args.scan_layers,
                            args.profile, args.attention)}
    if args.peer:
        result.update(peer_bench(args.model, shape, args.steps, peak))
        result["speedup_over_peer"] = round(result["train_tokens_per_s"]
                                            / result["peer_tokens_per_s"], 2)
    return result


def peer_command(args: argparse.Namespace) -> dict:
    shape, peak, info = shape_info(args)
    return {**info, **peer_bench(args.model, shape, args.steps, peak)}
