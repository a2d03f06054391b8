"""Benchmarks that print ONE JSON object on stdout: `python scripts/bench.py SUBCOMMAND [options]`.

    compile   lower + compile time of the jitted train step as depth grows, scanned vs unrolled;
              defaults: decoder, d_model 256, 4 heads, d_ff 1024, context 128, batch 8, vocab 64,
              AdamW, causal-LM loss; depths 2 and 32 for both scan_layers=true and false

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
from flax import nnx

from jaxformer.config import ModelConfig, OptimConfig, to_dict
from jaxformer.models import build_model
from jaxformer.run_info import run_metadata
from jaxformer.training.optim import make_optimizer, make_schedule
from jaxformer.training.state import create_train_state, split_model
from jaxformer.training.step import make_train_step

# Compile times must be cold: no persistent cache may answer for XLA.
jax.config.update("jax_enable_compilation_cache", False)


def machine_info() -> dict:
    """Versions, git SHA and devices as runs record them, plus what skews CPU timings."""
    return {**run_metadata(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}


# -- compile --------------------------------------------------------------------------------------
def bench_model_config(args: argparse.Namespace, depth: int, scan: bool) -> ModelConfig:
    return ModelConfig(
        kind="decoder", vocab_size=args.vocab, max_len=args.context, d_model=args.d_model,
        n_heads=args.n_heads, n_layers=depth, d_ff=args.d_ff, dropout=args.dropout,
        scan_layers=scan,
    )


def time_train_step_compile(model_cfg: ModelConfig, batch_size: int) -> tuple[float, float]:
    """(lower_s, compile_s) of a fresh train-step jit on abstract inputs: shapes only, no arrays."""
    optim = OptimConfig()
    tx, schedule = make_optimizer(optim, 1000), make_schedule(optim, 1000)
    abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, 0))
    graphdef, abstract_params, rest = split_model(abstract_model)
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx, 0), abstract_params)
    # clm batches hold context + 1 tokens: the step feeds tokens[:, :-1] and predicts tokens[:, 1:]
    shape = (batch_size, model_cfg.max_len + 1)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32)}
    train_step = make_train_step(graphdef, rest, tx, schedule, "clm")  # a new jit: empty caches
    start = time.perf_counter()
    lowered = train_step.lower(abstract_state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def time_depths(args: argparse.Namespace, scan: bool, depths: list[int]) -> dict:
    """Median lower/compile seconds per depth, and the deepest one's cost over the shallowest."""
    mode = "scan" if scan else "unrolled"
    timings: dict = {}
    for depth in depths:
        runs = [time_train_step_compile(bench_model_config(args, depth, scan), args.batch)
                for _ in range(args.repeats)]
        timings[f"lower_s_depth_{depth}"] = round(statistics.median(r[0] for r in runs), 3)
        timings[f"compile_s_depth_{depth}"] = round(statistics.median(r[1] for r in runs), 3)
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
    }


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 32],
                        help="n_layers to time with scan_layers=true")
    parser.add_argument("--unrolled-depths", type=int, nargs="+", default=[2, 32],
                        help="n_layers to time with scan_layers=false")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence (max_len)")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=1, help="median of this many compiles")


# name -> (help, add_options, run); train / sample / peer benchmarks slot in here
SUBCOMMANDS: dict[str, tuple[str, Callable, Callable[[argparse.Namespace], dict]]] = {
    "compile": ("train-step compile time vs depth, scanned and unrolled",
                add_compile_options, compile_bench),
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
