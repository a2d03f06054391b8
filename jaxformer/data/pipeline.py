"""grain pipelines: fixed-shape training batches with a checkpointable position, and fixed-size
batches over held-out arrays.

What a batch holds is the objective's business (jaxformer/objectives/): an `Encoding` turns a
list of problems into numpy arrays, deterministically per problem (so a fixed training set is
encoded once), and may then randomise each batch from a seeded generator (masked-LM corruption).
A vector task (data/vectors.py) draws its examples as arrays already.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Protocol

import grain
import numpy as np

Arrays = dict[str, np.ndarray]
# third entry of the per-batch randomisation seeds, so they never coincide with the problem-sampling
# seeds (seed, index)
RANDOMIZE_STREAM = 7


class Encoding(Protocol):
    """What the pipeline asks of an objective."""

    randomizes: bool  # whether `randomize` does anything (else it is not called)

    def encode(self, task: Any, problems: Any) -> Arrays:
        """The problems as one batch of arrays; deterministic per problem."""

    def randomize(self, task: Any, arrays: Arrays, rng: np.random.Generator) -> Arrays:
        """Per-batch randomness on top of `encode` (identity for most objectives)."""


def train_dataset(task: Any, encoding: Encoding, batch_size: int, seed: int) -> grain.MapDataset:
    """An endless, seeded MapDataset of batches (random access: batch i is always the same).

    A prepared corpus (data/text.py) epochs over its rows, read by index from the memory-mapped
    shards; with task.train_size set, epochs over that many unique problems; both reshuffled
    every epoch. Otherwise every batch draws fresh non-held-out problems, seeded by (seed, i).
    `encoding.randomize` draws per batch index from (seed, i, RANDOMIZE_STREAM): masks differ
    between epochs.
    """
    corpus_rows = getattr(task, "train_rows", None)  # a prepared corpus: rows read by index
    if corpus_rows is not None:
        dataset = (
            grain.MapDataset.range(corpus_rows).shuffle(seed=seed).repeat()
            .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
            .map(lambda rows: encoding.encode(task, rows))
        )
    elif task.cfg.train_size is not None:
        arrays = encoding.encode(task, task.train_problems(task.cfg.train_size, seed))
        dataset = (
            grain.MapDataset.range(task.cfg.train_size).shuffle(seed=seed).repeat()
            .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
            .map(lambda rows: {key: value[rows] for key, value in arrays.items()})
        )
    else:
        def fresh_batch(index: int) -> Arrays:
            return encoding.encode(task, task.sample_train(np.random.default_rng([seed, index]),
                                                           batch_size))
        dataset = grain.MapDataset.range(sys.maxsize).map(fresh_batch)
    if not encoding.randomizes:
        return dataset

    def randomized(index: int, arrays: Arrays) -> Arrays:
        return encoding.randomize(task, arrays, np.random.default_rng([seed, index, RANDOMIZE_STREAM]))
    return dataset.map_with_index(randomized)


def train_iterator(task: Any, encoding: Encoding, batch_size: int, seed: int,
                   rows: slice = slice(None)) -> grain.DatasetIterator:
    """Iterator whose `get_state()` / `set_state()` is the data position saved with checkpoints.

    `rows` picks this process's share of every global batch (multi-host: each process feeds its
    own devices), so the global batch is the same whatever the process count."""
    read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    dataset = train_dataset(task, encoding, batch_size, seed)
    if rows != slice(None):
        dataset = dataset.map(lambda batch: {key: value[rows] for key, value in batch.items()})
    return iter(dataset.to_iter_dataset(read_options))


def padded_batches(arrays: Arrays, batch_size: int) -> Iterator[tuple[Arrays, int]]:
    """(batch, real rows) of `batch_size` rows each, the last one zero-padded, so one compiled
    function serves them all."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in arrays.items()}
        size = len(next(iter(chunk.values())))
        if size < batch_size:
            chunk = {k: np.concatenate([v, np.zeros((batch_size - size, *v.shape[1:]), v.dtype)])
                     for k, v in chunk.items()}
        yield chunk, size
