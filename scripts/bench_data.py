"""`python scripts/bench.py data`: is the input pipeline ever the bottleneck? Rows/s the grain
pipeline supplies from a prepared corpus (task=text: rows read from the memory-mapped shards,
segment ids and positions computed, batched, per the run's seeded order) next to the rows/s the
train step consumes at the same shape, measured in the same run.

The corpus is the default one (Python's stdlib, conf/data/python_stdlib.yaml) with a BPE of the
shape's vocabulary, prepared first if needed (a second's check when it is up to date).
"""

from __future__ import annotations

import argparse
import statistics
import time

from hydra import compose, initialize_config_dir

from jaxformer.cli.app import CONF_DIR
from jaxformer.config import register_configs, to_train_config
from jaxformer.data.pipeline import train_iterator
from jaxformer.data.tasks import build_task
from jaxformer.objectives import get_objective
from jaxformer.training.setup import ensure_corpus

import bench_train  # noqa: E402 (scripts/ is on sys.path: this file's folder)


def text_config(shape: bench_train.Shape, out_dir: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose("train", [
            "task=text", f"data.out_dir={out_dir}", f"tokenizer.vocab_size={shape.vocab}",
            f"task.seq_len={shape.context}", f"model.max_len={shape.context}"]))


def pipeline_rows_per_s(task, batch: int, batches: int, repeats: int) -> list[float]:
    """Rows/s of the train iterator (one thread, as training reads it), after its first batch."""
    rates = []
    for repeat in range(repeats):
        iterator = train_iterator(task, get_objective("text_clm"), batch, seed=repeat)
        next(iterator)  # start-up: the first batch, the prefetch thread
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batch * batches / (time.perf_counter() - start))
    return rates


def data_command(args: argparse.Namespace) -> dict:
    shape = bench_train.SHAPES[args.shape]
    config = text_config(shape, args.data_dir or f"data/python_stdlib_bpe{shape.vocab}")
    ensure_corpus(config)
    task = build_task(config.task)
    rates = pipeline_rows_per_s(task, shape.batch, args.batches, args.repeats)
    pipeline = statistics.median(rates)
    step = bench_train.train_bench("decoder", shape, args.steps, peak=1.0)  # MFU unused here
    step_s = step["step_ms"] / 1e3
    consumed = shape.batch / step_s
    return {"shape": args.shape, "corpus": config.task.data_dir, "batch": shape.batch,
            "seq_len": shape.context, "train_rows": task.train_rows,
            "pipeline_rows_per_s": round(pipeline, 1),
            "pipeline_rows_per_s_runs": [round(rate, 1) for rate in rates],
            "step_ms": step["step_ms"], "step_rows_per_s": round(consumed, 2),
            "pipeline_over_step": round(pipeline / consumed, 1)}


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(bench_train.SHAPES), default="bench-small")
    parser.add_argument("--data-dir", help="a prepared corpus (default: the stdlib, prepared)")
    parser.add_argument("--batches", type=int, default=200, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    parser.add_argument("--steps", type=int, default=5, help="train steps timed (median)")
