"""scripts/bench.py prints one JSON object per subcommand (a smoke run at toy sizes)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO


def bench_module(name: str = "bench"):
    """A module of scripts/ imported in this process (scripts/ is no package): its subcommands
    run without a Python start-up of their own."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module(name)


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_compile_bench_prints_one_json_object():
    done = run_bench("compile", "--d-model", "16", "--n-heads", "2", "--d-ff", "32",
                     "--context", "8", "--batch", "2", "--depths", "1", "2",
                     "--unrolled-depths", "1", "--remat-depth", "2", "--remat-policies", "none",
                     "full")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert result["bench"] == "compile" and result["model"]["d_model"] == 16
    scan = result["scan"]
    assert result["compile_s_depth_2"] == scan["compile_s_depth_2"]  # headline: the scanned stack
    assert scan["compile_s_depth_1"] > 0 and scan["compile_s_depth_2"] > 0
    assert scan["compile_ratio_2_over_1"] > 0 and "total_ratio_2_over_1" in scan
    assert "compile_s_depth_1" in result["unrolled"]
    remat = result["remat"]  # XLA's temp memory per model.remat policy
    assert remat["depth"] == 2 and remat["scan_full"]["temp_mib"] < remat["scan_none"]["temp_mib"]
    assert {"versions", "devices", "cpu_count"} <= set(result["machine"])


def test_sample_bench_prints_one_json_object():
    done = run_bench("sample", "--vocab", "64", "--d-model", "16", "--n-heads", "2",
                     "--n-layers", "1", "--d-ff", "32", "--context", "16", "--batch", "2",
                     "--prompt-len", "4", "--new-tokens", "6", "--repeats", "1", "--no-peer")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bench"] == "sample" and result["model"]["vocab_size"] == 64
    assert result["new_tokens"] == 6 and result["top_k"] == 50 and result["top_p"] == 0.9
    assert result["sample_tokens_per_s"] > 0 and result["prefill_ms"] > 0
    assert result["compile_s"] > 0 and isinstance(result["decode_step_ms"], float)  # noisy here
    assert result["bare_step_ms"] > 0 and "bare_over_decode_step" in result  # the reference loop
    assert "hf_tokens_per_s" not in result  # --no-peer: transformers is not run


def test_train_bench_with_its_peer_prints_one_json_object(tmp_path):
    done = run_bench("train", "--shape", "tiny", "--model", "encoder_decoder", "--steps", "2",
                     "--peer", "--profile", str(tmp_path / "trace"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bench"] == "train" and result["shape"] == "tiny" and result["batch"] == 4
    assert {"train_tokens_per_s", "mfu", "compile_s", "peak_memory_mb"} <= set(result)
    assert 0 < result["mfu"] < 1 and result["peak_flops"] > 0 and result["compile_s"] > 0
    assert result["peer"] == "Seq2Seq" and result["peer_tokens_per_s"] > 0
    assert result["speedup_over_peer"] == round(result["train_tokens_per_s"]
                                                / result["peer_tokens_per_s"], 2)
    profile = result["profile"]  # per-op times from a real trace, which stays on disk
    assert Path(profile["trace"]).is_file() and profile["traced_ms_per_step"] > 0
    assert len(profile["top_ops_ms_per_step"]) > 3
    assert all(ms >= 0 for ms in profile["top_ops_ms_per_step"].values())


def test_flops_per_token_by_hand():
    """bench-small decoder: 6 x (4 blocks of 4d^2 + 2df, plus the d x V head) + 6 L T d."""
    bench_train = bench_module("bench_train")
    SHAPES, flops_per_token = bench_train.SHAPES, bench_train.flops_per_token

    d, f, v, n, t = 256, 1024, 8192, 4, 256
    assert flops_per_token("decoder", SHAPES["bench-small"]) == 6 * (n * (4 * d * d + 2 * d * f)
                                                                     + d * v) + 6 * n * t * d
    assert flops_per_token("encoder", SHAPES["bench-small"]) == 6 * (n * (4 * d * d + 2 * d * f)
                                                                     + d * d + d * v) + 12 * n * t * d
    # llama: q and out d x d, k and v d x d/2 (2 query heads per kv head), SwiGLU's three
    # d x 680 (2/3 of d_ff, to a multiple of 8), an untied d x V head (the input table is a lookup)
    assert flops_per_token("llama", SHAPES["bench-small"]) == 6 * (
        n * (2 * d * d + 2 * d * d // 2 + 3 * d * 680) + d * v) + 6 * n * t * d


def test_llama_peer_is_transformers_llama_of_the_exported_config(capsys):
    result = bench_module().main(["peer", "--shape", "tiny", "--model", "llama", "--steps", "1"])
    assert json.loads(capsys.readouterr().out) == result  # the one JSON object, printed
    assert result["peer"] == "LlamaForCausalLM" and result["peer_tokens_per_s"] > 0


def test_unknown_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        bench_module().main(["nope"])
    assert exited.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
