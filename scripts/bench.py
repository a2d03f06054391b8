"""Benchmarks that print ONE JSON object on stdout: `python scripts/bench.py SUBCOMMAND [options]`.

    train     tokens/s of the jitted train step (forward, backward, AdamW) after compile, median
              over --steps; MFU against a measured float32 matmul peak; compile time; memory.
              --shape bench-small|gpt2-124m --model decoder|encoder|encoder_decoder; --peer also
              times the PyTorch peer (HF GPT2LMHeadModel, BertForMaskedLM, torch.nn.Transformer)
              in the same process, so the output carries the ratio (scripts/bench_train.py)
    peer      the peer alone

    compile   lower + compile time and XLA's temp memory of the jitted train step as depth grows,
              scanned vs unrolled, and per model.remat policy at --remat-depth (default 8);
              defaults: decoder, d_model 256, 4 heads, d_ff 1024, context 128, batch 8, vocab 64,
              AdamW, causal-LM loss; depths 2 and 32 for both scan_layers=true and false
    data      rows/s of the text input pipeline (a prepared corpus, grain) next to the rows/s the
              train step consumes at the same shape, in the same run (scripts/bench_data.py)
    sample    tokens/s of KV-cache sampling (jaxformer.models.decoding.generate, after compile, median of
              --repeats), prefill and per-step times; the step time of a bare loop of the same
              matmuls (the memory-bound reference: bare_over_decode_step); and in the same run
              Hugging Face `GPT2LMHeadModel.generate()` of the same shape on PyTorch CPU
              (--no-peer skips it);
              defaults: vocab 8192, d_model 256, 4 layers, 4 heads, d_ff 1024, context 256,
              8 prompts of 16 tokens, 112 new tokens, temperature 0.8, top-k 50, top-p 0.9

Each subcommand is a function `(args) -> dict` registered in `SUBCOMMANDS` with its own argparse
options; `machine_info()` is added to every result, so numbers carry the box they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import REMAT_POLICIES, ModelConfig, OptimConfig, to_dict
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
from jaxformer.models import build_model
from jaxformer.tracking import run_metadata
from jaxformer.models.decoding import generate
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.models import split_model
from jaxformer.training.state import create_train_state
from jaxformer.objectives import get_objective
from jaxformer.training.step import make_train_step

import bench_data  # noqa: E402 (scripts/ is on sys.path: this file's folder)
import bench_train  # noqa: E402

# Compile times must be cold: no persistent cache may answer for XLA.
jax.config.update("jax_enable_compilation_cache", False)


def machine_info() -> dict:
    """Versions, git SHA and devices as runs record them, plus what skews CPU timings."""
    return {**run_metadata(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}


# -- compile --------------------------------------------------------------------------------------
def bench_model_config(args: argparse.Namespace, depth: int, scan: bool,
                       remat: str = "none") -> ModelConfig:
    return ModelConfig(
        kind="decoder", vocab_size=args.vocab, max_len=args.context, d_model=args.d_model,
        n_heads=args.n_heads, n_layers=depth, d_ff=args.d_ff, dropout=args.dropout,
        scan_layers=scan, remat=remat,
    )


def time_train_step_compile(model_cfg: ModelConfig, batch_size: int) -> tuple[float, float, int]:
    """(lower_s, compile_s, XLA temp bytes) of a fresh train-step jit on abstract inputs: shapes
    only, no arrays. Temp bytes are what the step needs beyond its arguments and outputs: the
    activations kept for the backward pass, which model.remat trades for recomputation."""
    optim = OptimConfig()
    tx, schedule = make_optimizer(optim, 1000), make_schedule(optim, 1000)
    abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, 0))
    graphdef, abstract_params, rest = split_model(abstract_model)
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx, 0), abstract_params)
    # clm batches hold context + 1 tokens: the step feeds tokens[:, :-1] and predicts tokens[:, 1:]
    shape = (batch_size, model_cfg.max_len + 1)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32)}
    train_step = make_train_step(graphdef, rest, tx, schedule, get_objective("clm"))  # new jit
    start = time.perf_counter()
    lowered = train_step.lower(abstract_state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - lowered_at
    return lowered_at - start, compile_s, compiled.memory_analysis().temp_size_in_bytes


def time_depths(args: argparse.Namespace, scan: bool, depths: list[int]) -> dict:
    """Median lower/compile seconds per depth, and the deepest one's cost over the shallowest."""
    mode = "scan" if scan else "unrolled"
    timings: dict = {}
    for depth in depths:
        runs = [time_train_step_compile(bench_model_config(args, depth, scan), args.batch)
                for _ in range(args.repeats)]
        timings[f"lower_s_depth_{depth}"] = round(statistics.median(r[0] for r in runs), 3)
        timings[f"compile_s_depth_{depth}"] = round(statistics.median(r[1] for r in runs), 3)
        timings[f"temp_mib_depth_{depth}"] = round(runs[0][2] / 2**20, 2)
        print(f"{mode} depth {depth}: lower {timings[f'lower_s_depth_{depth}']}s, "
              f"compile {timings[f'compile_s_depth_{depth}']}s", file=sys.stderr)
    low, high = min(depths), max(depths)

    def total(depth: int) -> float:
        return timings[f"lower_s_depth_{depth}"] + timings[f"compile_s_depth_{depth}"]

    timings[f"compile_ratio_{high}_over_{low}"] = round(
        timings[f"compile_s_depth_{high}"] / timings[f"compile_s_depth_{low}"], 2)
    timings[f"total_ratio_{high}_over_{low}"] = round(total(high) / total(low), 2)
    return timings


def compile_bench(args: argparse.Namespace) -> dict:
    # the first compile of a process pays one-time backend setup: keep it out of the numbers
    time_train_step_compile(bench_model_config(args, 1, True), args.batch)
    model = {key: value for key, value in to_dict(bench_model_config(args, 1, True)).items()
             if key not in ("n_layers", "scan_layers")}
    scan = time_depths(args, True, args.depths)
    # the headline numbers: the default (scanned) stack's compile time per depth, at top level
    headline = {key: value for key, value in scan.items() if key.startswith("compile_")}
    return {
        **headline, "model": model, "batch": args.batch, "objective": "clm",
        "optimizer": "adamw", "repeats": args.repeats,
        "scan": scan, "unrolled": time_depths(args, False, args.unrolled_depths),
        "remat": remat_table(args),
    }


def remat_table(args: argparse.Namespace) -> dict:
    """Per model.remat policy at --remat-depth, scanned and unrolled: XLA's temp memory of the
    train step (the saved activations) and its compile time."""
    table = {"depth": args.remat_depth}
    for scan in (True, False):
        mode = "scan" if scan else "unrolled"
        for policy in args.remat_policies:
            _, compile_s, temp_bytes = time_train_step_compile(
                bench_model_config(args, args.remat_depth, scan, policy), args.batch)
            table[f"{mode}_{policy}"] = {"temp_mib": round(temp_bytes / 2**20, 2),
                                         "compile_s": round(compile_s, 3)}
            print(f"remat {policy} ({mode}, depth {args.remat_depth}): "
                  f"{table[f'{mode}_{policy}']}", file=sys.stderr)
    return table


def add_shape_options(parser: argparse.ArgumentParser, context: int, vocab: int) -> None:
    """The model and batch shape options every subcommand shares."""
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--context", type=int, default=context, help="tokens per sequence (max_len)")
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--batch", type=int, default=8, help="sequences (prompts)")


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 32],
                        help="n_layers to time with scan_layers=true")
    parser.add_argument("--unrolled-depths", type=int, nargs="+", default=[2, 32],
                        help="n_layers to time with scan_layers=false")
    add_shape_options(parser, context=128, vocab=64)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=1, help="median of this many compiles")
    parser.add_argument("--remat-depth", type=int, default=8)
    parser.add_argument("--remat-policies", nargs="+", default=["none", "full", "dots_saveable"],
                        choices=REMAT_POLICIES, help="model.remat values to compare")


# -- sample ---------------------------------------------------------------------------------------
def median_seconds(run: Callable[[], object], repeats: int) -> float:
    return interleaved_medians({"run": run}, repeats)["run"]


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run over `repeats` rounds that take the runs in turn: a shared
    machine's speed drifts between seconds, and ratios of runs timed side by side drift less."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def jax_decodes(args: argparse.Namespace) -> tuple[dict[str, Callable[[], object]], float]:
    """({"prefill": prefill + one draw, "decode": prefill + new tokens}, compile seconds):
    jaxformer.models.decoding.generate at the bench's shape, compiled."""
    model = build_model(sample_model_config(args), seed=0)
    prompts = np.random.default_rng(0).integers(5, args.vocab, (args.batch, args.prompt_len))
    lens = np.full(args.batch, args.prompt_len)
    controls = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop_tokens=(), key=jax.random.key(0))  # no stop token: every row runs to the end

    def decode(new_tokens: int):
        return lambda: jax.block_until_ready(
            generate(model, prompts, lens, max_new_tokens=new_tokens, **controls).tokens)

    start = time.perf_counter()
    decode(args.new_tokens)()
    compile_s = time.perf_counter() - start
    decode(1)()
    return {"prefill": decode(1), "decode": decode(args.new_tokens)}, compile_s


def bare_matmul_loop(args: argparse.Namespace) -> Callable[[], object]:
    """The memory-bound reference for decoding, compiled: a `fori_loop` of only a decode step's
    matmuls at the bench's shape (per layer: one fused QKV, the cache write, q.K^T and weights.V
    over the whole cache, the output projection, the MLP's two; then the tied output layer),
    argmax feeding the next token so no step can be hoisted. No norms, softmax or sampling."""
    d, heads, layers = args.d_model, args.n_heads, args.n_layers
    head_dim, width = d // heads, args.prompt_len + args.new_tokens
    rng = np.random.default_rng(0)

    def weight(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(shape[0]))

    params = {"embed": weight(args.vocab, d),
              "layers": [(weight(d, 3 * d), weight(d, d), weight(d, args.d_ff),
                          weight(args.d_ff, d)) for _ in range(layers)]}
    empty = jnp.zeros((args.batch, heads, width, head_dim), jnp.float32)

    @jax.jit
    def loop(params, tokens_b, caches):
        def step(i, carry):
            tokens_b, caches = carry
            pos = args.prompt_len + i
            x_bd = params["embed"][tokens_b]
            updated = []
            for (w_qkv, w_out, w_up, w_down), (k_bhwd, v_bhwd) in zip(params["layers"], caches):
                qkv_3bhd = (x_bd @ w_qkv).reshape(-1, 3, heads, head_dim).swapaxes(0, 1)
                q_bhd, k_bhd, v_bhd = qkv_3bhd
                k_bhwd = jax.lax.dynamic_update_slice_in_dim(k_bhwd, k_bhd[:, :, None], pos, 2)
                v_bhwd = jax.lax.dynamic_update_slice_in_dim(v_bhwd, v_bhd[:, :, None], pos, 2)
                scores_bhw = jnp.einsum("bhd,bhwd->bhw", q_bhd, k_bhwd)
                attended_bd = jnp.einsum("bhw,bhwd->bhd", scores_bhw, v_bhwd).reshape(-1, d)
                x_bd = x_bd + attended_bd @ w_out
                x_bd = x_bd + (x_bd @ w_up) @ w_down
                updated.append((k_bhwd, v_bhwd))
            logits_bv = x_bd @ params["embed"].T
            return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32), tuple(updated)

        return jax.lax.fori_loop(0, args.new_tokens, step, (tokens_b, caches))

    tokens_b = jnp.zeros((args.batch,), jnp.int32)
    caches = tuple((empty, empty) for _ in range(layers))

    def run():
        return jax.block_until_ready(loop(params, tokens_b, caches))

    run()  # compile
    return run


def time_jax_sampling(args: argparse.Namespace) -> dict:
    """The median of `repeats` full decodes (prefill + new tokens); a one-token decode (prefill +
    one draw) gives the prefill time and, by difference, the step (a difference of medians: noisy
    at toy sizes); and, timed in turn with them, the bare matmul loop's step."""
    decodes, compile_s = jax_decodes(args)
    medians = interleaved_medians({**decodes, "bare": bare_matmul_loop(args)}, args.repeats)
    total_s, prefill_s = medians["decode"], medians["prefill"]
    step_s = (total_s - prefill_s) / max(args.new_tokens - 1, 1)
    bare_step_s = medians["bare"] / args.new_tokens
    return {"sample_tokens_per_s": round(args.batch * args.new_tokens / total_s, 1),
            "sample_s": round(total_s, 4), "compile_s": round(compile_s, 2),
            "prefill_ms": round(1e3 * prefill_s, 3), "decode_step_ms": round(1e3 * step_s, 3),
            "bare_step_ms": round(1e3 * bare_step_s, 3),
            # the step's speed as a share of the memory-bound reference's (1.0: as fast); None
            # where the difference of medians is not positive (toy sizes)
            "bare_over_decode_step": round(bare_step_s / step_s, 2) if step_s > 0 else None}


def time_hf_sampling(args: argparse.Namespace) -> dict:
    """`transformers` GPT-2 of the same shape: generate() with the same controls, KV cache on,
    min_new_tokens = max_new_tokens so every row runs all the new tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.context, n_embd=args.d_model,
                        n_layer=args.n_layers, n_head=args.n_heads, n_inner=args.d_ff,
                        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model = GPT2LMHeadModel(config).eval()
    prompts = torch.randint(5, args.vocab, (args.batch, args.prompt_len))

    def decode():
        with torch.inference_mode():
            return model.generate(
                prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                pad_token_id=PAD_ID)

    assert decode().shape == (args.batch, args.prompt_len + args.new_tokens)  # also the warm-up
    total_s = median_seconds(decode, args.repeats)
    return {"hf_tokens_per_s": round(args.batch * args.new_tokens / total_s, 1),
            "hf_s": round(total_s, 4), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def sample_model_config(args: argparse.Namespace) -> ModelConfig:
    # GPT-2's layout: learned positions, pre-LN with a final norm, tanh GELU, tied head
    return ModelConfig(kind="decoder", vocab_size=args.vocab, max_len=args.context,
                       d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       d_ff=args.d_ff, activation="gelu_tanh", positions="learned", norm="pre")


def sample_bench(args: argparse.Namespace) -> dict:
    model = {key: value for key, value in to_dict(sample_model_config(args)).items()
             if key in ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff",
                        "activation", "scan_layers", "dtype")}
    result = {"model": model, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "repeats": args.repeats,
              **time_jax_sampling(args)}
    print(f"jaxformer: {result['sample_tokens_per_s']} tokens/s, decode step "
          f"{result['decode_step_ms']} ms, bare matmul loop {result['bare_step_ms']} ms",
          file=sys.stderr)
    if args.peer:
        result.update(time_hf_sampling(args))
        result["speedup_over_hf"] = round(result["sample_tokens_per_s"] / result["hf_tokens_per_s"], 2)
        print(f"transformers: {result['hf_tokens_per_s']} tokens/s", file=sys.stderr)
    return result


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    add_shape_options(parser, context=256, vocab=8192)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5, help="median of this many decodes")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also time transformers' GPT-2 generate() (PyTorch CPU)")


# name -> (help, add_options, run)
SUBCOMMANDS: dict[str, tuple[str, Callable, Callable[[argparse.Namespace], dict]]] = {
    "train": ("train-step tokens/s, MFU, compile time and memory of a model family "
              "(--peer: and its PyTorch peer's, in the same run)",
              bench_train.add_train_options, bench_train.train_command),
    "peer": ("the PyTorch peer's train-step tokens/s alone (HF GPT-2, BertForMaskedLM, "
             "torch.nn.Transformer)", bench_train.add_train_options, bench_train.peer_command),
    "compile": ("train-step compile time vs depth, scanned and unrolled",
                add_compile_options, compile_bench),
    "sample": ("KV-cache sampling tokens/s, and transformers' GPT-2 generate() for scale",
               add_sample_options, sample_bench),
    "data": ("text pipeline rows/s vs the train step's consumption at the same shape",
             bench_data.add_data_options, bench_data.data_command),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options, _) in SUBCOMMANDS.items():
        add_options(commands.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    run = SUBCOMMANDS[args.command][2]
    result = {"bench": args.command, **run(args), "machine": machine_info()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
