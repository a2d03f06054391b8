"""Device mesh, logical-axis sharding rules and multi-host start-up: JAX's own machinery, no more.

Parameters carry logical axis names (`out_sharding` metadata, e.g. ('embed', 'mlp')); one rules
table, `LOGICAL_RULES`, maps each name to mesh axes (t5x / MaxText style). The same model code
then runs on one device, data parallel, FSDP (parameters and optimizer state sharded over `fsdp`)
and tensor parallel (attention heads and MLP hidden units split over `tensor`).

Mesh axes: `data` (pure data parallel: replicas), `fsdp` (data parallel whose replicas also split
the parameters), `tensor` (model parallel inside a layer). Batches are split over data x fsdp.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer.config import MeshConfig
from jaxformer.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# logical axis name -> mesh axes it is split over (None: replicated). Parameters:
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp",  # d_model rows of every weight: FSDP shards parameters along them
    "mlp": "tensor",  # d_ff: column-parallel up projection, row-parallel down projection
    "heads": "tensor",  # n_heads * head_dim of q (columns) and the output projection (rows)
    # n_kv_heads * head_dim of k/v: split when the tensor axis divides the kv heads (variables
    # carry their head count as `shard_units`), replicated otherwise (multi-query attention)
    "kv_heads": "tensor", "head_dim": None,
    "vocab": "tensor",  # token table rows / logits columns
    "positions": None, "types": None, "classes": None, "layers": None, "features": None,
    # activations (distinct names: FSDP splits parameter rows, never the residual stream)
    "act_batch": BATCH_AXES, "act_length": None, "act_embed": None,
    "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor",
}


# -- mesh -----------------------------------------------------------------------------------------
def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 resolved to "the remaining devices"; checks the product."""
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise UserError(f"mesh.{free[0]} and mesh.{free[1]} are both -1: at most one mesh axis "
                        "may take the remaining devices")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise UserError(
                f"mesh {describe(sizes)} cannot cover {device_count} devices: the fixed axes "
                f"multiply to {fixed}, which does not divide {device_count}; pick sizes whose "
                "product divides the device count")
        sizes[free[0]] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise UserError(
            f"mesh {describe(sizes)} has {math.prod(sizes.values())} devices but "
            f"{device_count} are available: make mesh.data * mesh.fsdp * mesh.tensor = "
            f"{device_count} (or set one axis to -1)")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def describe(sizes: dict[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in sizes.items())


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagates inside the step
    return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


# -- logical names -> shardings -------------------------------------------------------------------
def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None,
                    units: dict[str, int] | None = None) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis `names`. With `shape` and `mesh`, a
    dimension that the mesh axes do not divide is replicated instead (a vocabulary of 17 on 2
    tensor shards), and a mesh axis is used at most once. `units` (logical name -> count) splits
    a dimension only in whole units (2 kv heads of 64 channels are not split over 4 shards)."""
    if not names:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no rule in jaxformer.parallel.LOGICAL_RULES")
        axes = LOGICAL_RULES[name] if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh is not None:
            axes = tuple(axis for axis in axes if mesh.shape[axis] > 1 and axis not in used)
            size = (units or {}).get(name, None if shape is None else shape[dim])
            if size is not None and axes and size % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for an (abstract) pytree, same structure: an nnx.Variable is placed by its
    logical axis names (optimizer moments inherit their parameter's Variable, hence its names),
    every other array is replicated (steps, counters, RNG keys)."""
    def sharding(leaf):
        if not isinstance(leaf, nnx.Variable):
            return replicated(mesh)
        if not jax.tree.leaves(leaf):  # no array: optax's MaskedNode for a frozen parameter
            return leaf
        names = leaf.get_metadata("out_sharding", None)
        units = dict(leaf.get_metadata("shard_units", ()))  # (name, count) pairs
        return leaf.replace(NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, units)))
    return jax.tree.map(sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their shardings: a restore or compile target."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                     sharding=sharding),
                        abstract_tree, shardings)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Run under `mesh`: activation constraints apply, and flax resolves the logical names of
    variables it builds abstractly (nnx.eval_shape) through the same rules table."""
    rules = [(name, axes) for name, axes in LOGICAL_RULES.items()]
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
        yield mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays whose leading (batch) dimension is split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names inside a `jax.set_mesh` context; a no-op
    outside one (single-device code, tests, interop) or on a one-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    if len(names) != x.ndim:  # a layer met without its length axis (one decoded token, (B, D)):
        names = (names[0], *[None] * (x.ndim - 2), names[-1])  # keep the batch and feature names
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


# -- batches --------------------------------------------------------------------------------------
def process_rows(global_batch: int) -> slice:
    """The rows of a global batch this process feeds (each host reads its own share)."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return slice(None)
    local = global_batch // count
    return slice(index * local, (index + 1) * local)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 global_rows: int) -> dict[str, jax.Array]:
    """One global jax.Array per field from this process's rows, split over data x fsdp."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(
                sharding, value, (global_rows, *value.shape[1:]))
            for key, value in local_batch.items()}


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly sharded, multi-host) arrays, whole on every process: a jitted
    function's outputs may be split over devices other processes own."""
    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)


# -- multi-host -----------------------------------------------------------------------------------
def cluster_detected() -> str | None:
    """The cluster environment jax.distributed.initialize() can read by itself, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU pod"
    return None


def initialize_distributed(cfg: MeshConfig) -> bool:
    """`jax.distributed.initialize` from config or the cluster environment (SLURM, TPU pods,
    JAX_COORDINATOR_ADDRESS). Must run before anything touches the devices. True if it ran."""
    explicit = cfg.coordinator_address is not None
    if cfg.distributed == "off" or (cfg.distributed == "auto" and not explicit
                                    and cluster_detected() is None):
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU processes talk through gloo (no effect on GPU/TPU); must be set before the backend starts
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=cfg.coordinator_address,
                      num_processes=cfg.num_processes, process_id=cfg.process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d (%s)", jax.process_index(), jax.process_count(),
             "config" if explicit else cluster_detected() or "auto-detected")
    return True


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics.jsonl, wandb and other unique outputs."""
    return jax.process_index() == 0
