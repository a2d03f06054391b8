"""Sharded training: mesh config, logical-axis rules, gradient accumulation, and the same losses
on 8 devices (data, FSDP, tensor parallel; one process, and two processes x 4 devices) as on one.

The multi-device runs happen in subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count
(this test process keeps its single CPU device); the single-device references run here.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from jax.sharding import AbstractMesh, PartitionSpec as P

from helpers import (
    FAMILIES, MESHES, MQA_MODEL, REPO, family_config, multidevice_env, read_losses, replace, run_module,
    tiny_config,
)
from jaxformer.config import MeshConfig, register_configs
from jaxformer.errors import UserError
from jaxformer.parallel import logical_to_spec, mesh_shape
from jaxformer.runs import RunDir
from jaxformer.training.loop import train

register_configs()
RTOL = 1e-5  # float32: sharded reductions sum in another order


def assert_same_losses(actual: dict, expected: dict, what: str) -> None:
    """Same steps, same losses; step keys may be ints or (from JSON) strings."""
    actual = {int(step): loss for step, loss in actual.items()}
    expected = {int(step): loss for step, loss in expected.items()}
    assert sorted(actual) == sorted(expected), what
    np.testing.assert_allclose([actual[s] for s in sorted(actual)],
                               [expected[s] for s in sorted(actual)], rtol=RTOL, err_msg=what)


# -- mesh and rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, devices, shape", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"data": 4, "fsdp": -1}, 8, (4, 2, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": -1, "tensor": 4}, 8, (2, 1, 4)),
])
def test_mesh_shape_resolves_the_remaining_devices(sizes, devices, shape):
    assert mesh_shape(MeshConfig(**sizes), devices) == shape


@pytest.mark.parametrize("sizes, devices, message", [
    ({"data": 3}, 8, "mesh data=3 fsdp=1 tensor=1 has 3 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, 8, "mesh.data and mesh.fsdp are both -1"),
    ({"data": -1, "fsdp": 3}, 8, "the fixed axes multiply to 3, which does not divide 8"),
])
def test_bad_mesh_is_one_line(sizes, devices, message):
    with pytest.raises(UserError, match=message) as caught:
        mesh_shape(MeshConfig(**sizes), devices)
    assert "\n" not in str(caught.value)


def test_mesh_axis_values_are_validated():
    with pytest.raises(UserError, match="mesh.tensor=0 must be a positive device count or -1"):
        MeshConfig(tensor=0)


def test_logical_names_map_to_mesh_axes():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "heads", "embed"), (2, 32, 32), mesh) == P(None, "tensor",
                                                                                  "fsdp")
    assert logical_to_spec(("vocab", "embed"), (17, 32), mesh) == P(None, "fsdp")  # 17 % 2 != 0
    assert logical_to_spec(("act_batch", "act_length", "act_embed"), (16, 5, 32), mesh) == P(
        ("data", "fsdp"), None, None)
    one_way = AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor"))  # size-1 axes are dropped
    assert logical_to_spec(("act_batch", "act_embed"), (16, 32), one_way) == P("data", None)
    assert logical_to_spec(("embed", "mlp"), (32, 64), one_way) == P(None, None)


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.max_num_timeout) == (2, 8, 3)


def test_mesh_errors_stop_the_cli_in_one_line(tmp_path):
    done = run_module("jaxformer.train", "mesh.data=3", f"hydra.run.dir={tmp_path}/run")
    assert done.returncode == 2 and done.stdout.strip() == ""
    assert done.stderr.strip() == (
        "error: mesh data=3 fsdp=1 tensor=1 has 3 devices but 1 are available: make mesh.data "
        "* mesh.fsdp * mesh.tensor = 1 (or set one axis to -1)")


# -- gradient accumulation ------------------------------------------------------------------------
def test_grad_accum_gives_the_full_batch_losses(tmp_path):
    """4 micro-batches of B/4 take the same optimizer steps as one batch of B."""
    losses = {}
    for accum in (1, 4):
        cfg = replace(tiny_config(steps=5, log_every=1, eval_every=0, grad_accum=accum,
                                  num_samples=0), task={"eval_size": 16})
        losses[accum] = read_losses(train(cfg, tmp_path / f"accum{accum}").metrics_path)
    assert_same_losses(losses[4], losses[1], "grad_accum=4 vs 1")


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(UserError, match="batch_size=16 is not divisible by trainer.grad_accum=3"):
        tiny_config(grad_accum=3)


# -- 8 devices in one process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    """The reference: every family on this process's one device, plus a 6-step decoder run."""
    root = tmp_path_factory.mktemp("single")
    losses = {family: read_losses(train(family_config(family), root / family).metrics_path)
              for family in FAMILIES}
    losses["decoder_6"] = read_losses(
        train(family_config("decoder", steps=6), root / "decoder_6").metrics_path)
    losses["decoder_mqa"] = read_losses(
        train(replace(family_config("decoder"), model=MQA_MODEL), root / "mqa").metrics_path)
    return losses


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_runs.py"), str(out)],
                          env=multidevice_env(8), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_losses_equal_one_device(single_device, eight_devices, family, mesh):
    _, result = eight_devices
    assert_same_losses(result["losses"][family][mesh], single_device[family], f"{family} {mesh}")


def test_parameters_and_optimizer_state_are_really_sharded(eight_devices):
    """data=2 fsdp=2 tensor=2: rows of each weight split over fsdp, heads / MLP units over tensor."""
    shards = eight_devices[1]["shards"]
    assert shards["mlp.up.kernel"] == [[2, 32, 64], [2, 16, 32]]  # (layers, embed, mlp)
    assert shards["attention.query.kernel"] == [[2, 32, 32], [2, 16, 16]]  # (layers, embed, heads)
    assert shards["attention.out.kernel"] == [[2, 32, 32], [2, 16, 16]]  # (layers, heads, embed)
    assert shards["embed.embedding"] == [[20, 32], [10, 16]]  # (vocab, embed)
    assert shards["adam.mu.mlp.up.kernel"] == shards["mlp.up.kernel"]  # moments follow params
    assert shards["attention.key.kernel"] == [[2, 32, 32], [2, 16, 16]]  # 2 kv heads: split


def test_one_kv_head_stays_whole_and_trains_as_on_one_device(single_device, eight_devices):
    """Multi-query attention on tensor=2: the kv head's 16 columns would split in two, but a head
    is never cut, so k/v are replicated over tensor (rows still split over fsdp)."""
    _, result = eight_devices
    assert result["shards_mqa"]["attention.key.kernel"] == [[2, 32, 16], [2, 16, 16]]
    assert result["shards_mqa"]["attention.query.kernel"] == [[2, 32, 32], [2, 16, 16]]
    assert_same_losses(result["losses"]["decoder_mqa"], single_device["decoder_mqa"],
                       "decoder_mqa data2_fsdp2_tensor2")


def test_bad_parallel_layouts_are_one_line(eight_devices):
    errors = eight_devices[1]["errors"]
    assert errors["mesh_product"].startswith("mesh data=3 fsdp=1 tensor=1 has 3 devices but 8")
    assert errors["batch"].startswith("trainer.batch_size=12 does not split into")
    assert errors["heads"] == ("model.n_heads=2 is not divisible by mesh.tensor=4: tensor "
                               "parallelism splits whole heads")
    assert all("\n" not in message for message in errors.values())


def test_checkpoint_from_8_devices_restores_on_another_mesh_and_on_one(single_device,
                                                                      eight_devices, tmp_path):
    out, result = eight_devices
    assert_same_losses(result["resumed_other_mesh"], single_device["decoder_6"],
                       "8 devices -> data2 fsdp2 tensor2")
    run_dir = tmp_path / "from_8"
    shutil.copytree(out / "decoder_data8_step4", run_dir)
    resumed = read_losses(train(family_config("decoder", steps=6), run_dir).metrics_path)
    assert_same_losses(resumed, single_device["decoder_6"], "8 devices -> 1 device")


# -- 2 processes x 4 devices ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_train_one_run(single_device, tmp_path):
    """jax.distributed over 2 processes (4 CPU devices each): each feeds its half of every batch,
    only process 0 writes metrics and Hydra files, and the losses are the one-device losses."""
    run_dir, port = tmp_path / "multihost", free_port()
    overrides = [
        "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.d_ff=64",
        "model.max_len=16", "task.max_digits=2", "task.eval_size=16", "trainer.steps=4",
        "trainer.batch_size=16", "trainer.log_every=1", "trainer.eval_every=100",
        "trainer.checkpoint_every=2", "trainer.eval_batch_size=32", "trainer.num_samples=0",
        "trainer.progress=false", "optim.schedule=constant", "optim.warmup_steps=0",
        "task.max_length=4", "logger.wandb.mode=disabled", "mesh.data=4", "mesh.fsdp=2",
        "mesh.distributed=on", f"mesh.coordinator_address=localhost:{port}",
        "mesh.num_processes=2", f"hydra.run.dir={run_dir}",
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxformer.train", *overrides,
                               f"mesh.process_id={pid}"], cwd=REPO, env=multidevice_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    report = "held-out greedy exact match"  # the run's summary: printed by process 0 only
    assert report in outputs[0][0] and report not in outputs[1][0]
    assert [r["step"] for r in RunDir(run_dir).metrics("train")] == [1, 2, 3, 4]  # one writer
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert_same_losses(read_losses(run_dir), single_device["decoder"],
                       "2 processes x 4 devices")
