"""Training on 8 devices, for tests/test_parallel.py (not a test module itself).

`python tests/multidevice_runs.py OUT_DIR` runs under
XLA_FLAGS=--xla_force_host_platform_device_count=8 (eight CPU devices in one process), trains every
family a few steps on several meshes through the real training loop, and writes OUT_DIR/result.json:
losses per family and mesh, parameter shard shapes, the mesh errors, and a checkpoint written on
8 devices then resumed on another mesh. The single-device references live in the test process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (  # noqa: E402
    FAMILIES, MESHES, MQA_MODEL, SHARDED, family_config, read_losses, replace,
)

from jaxformer.config import MeshConfig  # noqa: E402
from jaxformer.errors import UserError  # noqa: E402
from jaxformer.parallel import make_mesh, use_mesh  # noqa: E402
from jaxformer.training.loop import train  # noqa: E402
from jaxformer.training.state import init_train_state, state_layout  # noqa: E402


def shard_shapes(cfg, model: dict | None = None) -> dict[str, list[list[int]]]:
    """(global shape, one device's shard shape) of a few parameters on the 2 x 2 x 2 mesh."""
    mesh = make_mesh(MeshConfig(**MESHES["data2_fsdp2_tensor2"]))
    with use_mesh(mesh):
        model_cfg = replace(cfg, model={"vocab_size": 20, **(model or {})}).model
        layout = state_layout(model_cfg, optax.adam(1e-3), 0, mesh)
        state = init_train_state(model_cfg, optax.adam(1e-3), 0, layout.shardings)
    params = state.params
    picks = {
        "mlp.up.kernel": params["stack"]["blocks"]["mlp"]["up"]["kernel"],
        "attention.query.kernel": params["stack"]["blocks"]["attention"]["query"]["kernel"],
        "attention.out.kernel": params["stack"]["blocks"]["attention"]["out"]["kernel"],
        "attention.key.kernel": params["stack"]["blocks"]["attention"]["key"]["kernel"],
        "embed.embedding": params["embed"]["embedding"],
        "adam.mu.mlp.up.kernel": state.opt_state[0].mu["stack"]["blocks"]["mlp"]["up"]["kernel"],
    }
    return {name: [list(leaf.shape), list(leaf.get_value().addressable_shards[0].data.shape)]
            for name, leaf in picks.items()}


def mesh_error(cfg, run_dir: Path, **sections) -> str:
    try:
        train(replace(cfg, **sections), run_dir)
    except UserError as err:
        return str(err)
    return "no error"


def main(out_dir: Path) -> None:
    assert jax.device_count() == 8, f"expected 8 devices, got {jax.device_count()}"
    result: dict = {"losses": {}, "errors": {}}
    for family in FAMILIES:
        result["losses"][family] = {}
        for mesh_name, mesh in MESHES.items():
            cfg = family_config(family, mesh=mesh)
            run = train(cfg, out_dir / family / mesh_name)
            result["losses"][family][mesh_name] = read_losses(run.metrics_path)
    result["shards"] = shard_shapes(family_config("decoder"))
    mqa = replace(family_config("decoder", mesh=SHARDED), model=MQA_MODEL)
    result["losses"]["decoder_mqa"] = read_losses(train(mqa, out_dir / "mqa").metrics_path)
    result["shards_mqa"] = shard_shapes(family_config("decoder"), MQA_MODEL)

    # a checkpoint written on 8 devices (data=8, step 4) resumes on the 2 x 2 x 2 mesh
    written = out_dir / "decoder" / "data8"
    shutil.copytree(written, out_dir / "decoder_data8_step4")  # for the 1-device restore
    resumed = train(family_config("decoder", steps=6, mesh=MESHES["data2_fsdp2_tensor2"]), written)
    result["resumed_other_mesh"] = read_losses(resumed.metrics_path)

    base = family_config("decoder")
    errors = out_dir / "errors"
    result["errors"]["mesh_product"] = mesh_error(base, errors, mesh={"data": 3})
    result["errors"]["batch"] = mesh_error(base, errors, trainer={"batch_size": 12})
    result["errors"]["heads"] = mesh_error(base, errors, mesh={"data": 2, "tensor": 4})
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
