"""Every op and layer on 4 forced CPU devices: gradients under shard_map(check_vma=True) and
under jit with batch-sharded inputs equal one device's; the compiled programs gather no
activation; the training program's step and its multi-process start.

The 4-device checks run in one subprocess (tests/sharding_worker.py), so the rest of the suite
keeps one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError
from train.main import distributed_args

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "sharding_worker.py"
TOL = 1e-5

OPS = [
    "sample_depthwise",
    "deform_sample_depthwise",
    "scope_im2col",
    "deform_scope_im2col",
    "sample_conv",
    "sample_conv_grouped",
    "deform_sample_conv",
    "nd_linear_sample",
    "nd_linear_sample_shared_data",
]
LAYERS = [
    "DeformKernel2d",
    "LocalDeformKernel2d_features",
    "DeformKernelConv2d",
    "GlobalDeformKernel2d",
    "DeformConv2d",
]


def four_device_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    return env


def run_worker(*parts: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(WORKER), *parts],
        cwd=REPO,
        env=four_device_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.split("RESULT ", 1)[1])


@pytest.fixture(scope="module")
def ops_result() -> dict:
    return run_worker("ops", "layers")


@pytest.fixture(scope="module")
def reference_lowering_result() -> dict:
    """The same checks with every primitive lowered as on a platform without a kernel."""
    return run_worker("reference_lowering", "ops", "layers")


def _assert_sharded_like_one_device(case: dict, name: str) -> None:
    assert "shard_map_error" not in case, case
    assert case["shard_map_grad_err"] < TOL, (name, case)
    for kind in ("explicit", "auto"):
        assert f"{kind}_error" not in case, (name, case)
        r = case[kind]
        assert r["grad_err"] < TOL and r["y_err"] < TOL, (name, kind, r)
        assert r["value_err"] < 1e-4, (name, kind, r)  # a sum of N*H*W*C float32 terms
        # The output stays split along the batch, and nothing of an activation's size (one
        # sample of x or more) is gathered; the only collective is the weight gradient's sum.
        assert r["y_spec"][0] == "data", (name, kind, r)
        assert r["large_all_gathers"] == [], (name, kind, r)


@pytest.mark.parametrize("name", OPS)
def test_op_gradients_match_one_device_and_nothing_is_gathered(ops_result, name):
    _assert_sharded_like_one_device(ops_result["ops"][name], name)
    assert ops_result["ops"][name]["auto"]["dk_custom_calls"] > 0


# What tests/sharding_worker.py checks on the reference lowering (REFERENCE_OPS, _LAYERS).
REFERENCE_CASES = [
    "deform_sample_depthwise",
    "deform_sample_conv",
    "nd_linear_sample_shared_data",
    "DeformConv2d",
]


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_the_reference_lowering_shards_like_the_kernels(reference_lowering_result, name):
    """The branch of a platform without a kernel (TPU): the same primitives and rules, each
    lowered to its jax.numpy reference; as sharded, and with no custom call."""
    r = reference_lowering_result
    case = r["ops"][name] if name in r["ops"] else r["layers"][name]
    _assert_sharded_like_one_device(case, name)
    assert case["auto"]["dk_custom_calls"] == case["explicit"]["dk_custom_calls"] == 0, case


def test_the_reference_lowering_under_vmap_and_second_order(reference_lowering_result):
    r = reference_lowering_result
    assert r["vmap_in_shard_map"]["shared"] < TOL and r["vmap_in_shard_map"]["per_element"] < TOL
    for name in ("sample_depthwise", "deform_sample_depthwise", "sample_conv"):
        assert r["hvp"][f"{name}_norm"] > 1.0, r["hvp"]
        assert r["hvp"][f"{name}_shard_map"] < TOL and r["hvp"][f"{name}_jit"] < TOL, r["hvp"]


def test_vmap_inside_shard_map_matches_one_device(ops_result):
    r = ops_result["vmap_in_shard_map"]
    assert r["shared"] < TOL and r["per_element"] < TOL, r


def test_hessian_vector_product_in_x_matches_one_device(ops_result):
    r = ops_result["hvp"]
    for name in ("sample_depthwise", "deform_sample_depthwise", "sample_conv"):
        assert r[f"{name}_norm"] > 1.0, r  # a non-trivial H v
        assert r[f"{name}_shard_map"] < TOL and r[f"{name}_jit"] < TOL, (name, r)


def test_indivisible_batch_and_missing_axis_fail_before_compiling(ops_result):
    """JAX itself rejects both when the batch is placed (device_put, jit in_shardings or
    shard_map in_specs), before anything is traced or compiled."""
    r = ops_result["bad_input"]
    is_value_error, message = r["device_put_indivisible"]
    assert is_value_error and "dimension size is 6" in message, r
    is_value_error, message = r["shard_map_indivisible"]
    assert is_value_error and "not evenly divisible" in message, r
    is_value_error, message = r["missing_axis"]
    assert is_value_error and "batch" in message and "not found in mesh" in message, r
    is_value_error, message = r["shard_map_missing_axis"]
    assert is_value_error and "must refer to an axis" in message, r


@pytest.mark.parametrize("name", LAYERS)
def test_layer_gradients_match_one_device_and_nothing_is_gathered(ops_result, name):
    _assert_sharded_like_one_device(ops_result["layers"][name], name)


@pytest.mark.slow
def test_train_step_on_4_devices_equals_1_device_and_gathers_nothing():
    result = run_worker("train")["train"]
    for conv in ("local_dk", "dk_dcn"):
        r = result[conv]
        assert r["param_change"] > 1e-3, r  # the step moved the parameters
        assert r["param_err"] < TOL, (conv, r)
        assert r["all_gathers"] == [] and r["all_reduces"] > 0, (conv, r)
        # Every batched custom call runs on its device's 4 of the 16 images.
        assert r["custom_calls"] > 0 and r["custom_call_batches"] == [4], (conv, r)


# --- multi-process start ------------------------------------------------------------------


def test_distributed_args_from_the_environment():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    assert distributed_args(env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    assert distributed_args({}) is None
    assert distributed_args({"SLURM_NTASKS": "1"}) is None
    assert distributed_args({"SLURM_NTASKS": "8"}) == {}  # JAX detects the cluster
    assert distributed_args({"OMPI_COMM_WORLD_SIZE": "2"}) == {}
    for missing in env:
        partial = {k: v for k, v in env.items() if k != missing}
        with pytest.raises(ConfigError, match=missing):
            distributed_args(partial)
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
        distributed_args(dict(env, JAX_NUM_PROCESSES="two"))
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID=2"):
        distributed_args(dict(env, JAX_PROCESS_ID="2"))
    with pytest.raises(ConfigError, match="host:port"):
        distributed_args(dict(env, JAX_COORDINATOR_ADDRESS="10.0.0.1"))


def test_partial_multi_process_environment_is_a_one_line_error(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS="127.0.0.1:1")
    env.pop("JAX_NUM_PROCESSES", None)
    env.pop("JAX_PROCESS_ID", None)
    out = subprocess.run(
        [sys.executable, "-m", "train", "--config", "digits_deformed", "--workdir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "dk-train: error: multi-process launch: JAX_NUM_PROCESSES, JAX_PROCESS_ID not set "
        "(set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or none)"
    ], out.stderr
    assert "Traceback" not in out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- two processes on localhost -----------------------------------------------------------

# The runs read a digits_deformed folder of one copy per source digit (`small_digits`).
SMALL_RUN = [
    "data.generate=''",
    "data.workers=1",
    "model.width=8",
    "model.stage_sizes=(1,1,1)",
    "optim.batch_size=16",
    "optim.num_steps=5",
    "optim.warmup_epochs=0.0",
    # Small enough that float rounding (all-reduces summed in another order across processes)
    # is not amplified past 1e-5 in 5 steps; at 0.2 the difference reaches 3e-4.
    "optim.learning_rate=0.02",
    "run.checkpoint_every_steps=2",
    "run.progress=False",
]


def small_digits(root: Path) -> Path:
    from train import digits

    return digits.generate(root, train_copies=1, val_copies=1)


def train_command(data_root: Path, workdir: Path) -> list[str]:
    sets = [f"data.root={data_root}", *SMALL_RUN]
    return [
        sys.executable,
        "-m",
        "train",
        "--config",
        "digits_deformed",
        "--workdir",
        str(workdir),
        *[a for s in sets for a in ("--set", s)],
    ]


def start_pair(data_root: Path, workdir: Path, logs: Path) -> list[subprocess.Popen]:
    """Two processes of 2 CPU devices each, one run over 4 devices (gloo collectives)."""
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        log = (logs / f"{workdir.name}_{i}.log").open("w")
        procs.append(
            subprocess.Popen(
                train_command(data_root, workdir), cwd=REPO, env=env, stdout=log, stderr=log
            )
        )
    return procs


def wait_all(procs, timeout: float) -> list[int]:
    """Return codes; a process still running at the timeout is killed (a peer that lost its
    partner aborts only after JAX's own timeout)."""
    import time

    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def load_params(workdir: Path, step: int):
    """The params of checkpoint `step` as numpy arrays, whatever topology saved them."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=args)["params"]


def params_err(a, b) -> float:
    """The largest per-leaf max |a - b| / max |b|."""
    import jax
    import numpy as np

    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)) for x, y in leaves)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_a_kill(tmp_path):
    import time

    data_root = small_digits(tmp_path / "digits")
    # One process with 4 devices.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run(
        train_command(data_root, tmp_path / "one"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one = load_params(tmp_path / "one", 5)

    # The same run as two processes of 2 devices.
    codes = wait_all(start_pair(data_root, tmp_path / "two", tmp_path), timeout=600)
    assert codes == [0, 0], (tmp_path / "two_0.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["devices"] == 4 and summary["steps"] == 5
    two = load_params(tmp_path / "two", 5)
    assert params_err(two, one) < TOL

    # Kill one process once step 2 is checkpointed; its peer cannot go on (it aborts or is
    # killed at the timeout); the pair restarted with the same command resumes from step 2.
    workdir = tmp_path / "killed"
    procs = start_pair(data_root, workdir, tmp_path)
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / "2" / "commit_success.txt").exists():
        assert time.time() < deadline and procs[1].poll() is None, "no checkpoint at step 2"
        time.sleep(0.05)
    procs[1].kill()
    codes = wait_all(procs, timeout=120)
    assert codes[1] != 0
    assert not (workdir / "checkpoints" / "5").exists()
    codes = wait_all(start_pair(data_root, workdir, tmp_path), timeout=600)
    assert codes == [0, 0], (tmp_path / "killed_0.log").read_text()[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] in (2, 4) and summary["steps"] == 5
    # Same topology, same checkpointed state: the resumed pair ends where the unbroken one did.
    assert params_err(load_params(workdir, 5), two) < TOL
    assert (
        summary["params_sha256"]
        == json.loads((tmp_path / "two" / "summary.json").read_text())["params_sha256"]
    )
