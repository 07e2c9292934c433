import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(command: list[str], cwd: Path) -> None:
    # Open MPI refuses root unless told; CI runs as root.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


ACCELERATE_DDP_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: 29533
mixed_precision: 'no'
use_cpu: true
mpirun_config:
  mpirun_hostfile: {hostfile}
"""


def launch(launcher: str, folder: Path) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), str(folder)]
    # accelerate starts several CPU processes through mpirun (Open MPI; CI installs it).
    (folder / "hostfile").write_text("localhost slots=2\n")
    (folder / "ddp.yaml").write_text(ACCELERATE_DDP_CPU.format(hostfile=folder / "hostfile"))
    return ["accelerate", "launch", "--config_file", str(folder / "ddp.yaml"), str(WORKER), str(folder)]


def test_two_processes_distil_an_moe_student_whose_unfused_experts_a_step_may_not_reach(tmp_path):
    """An expert no token reaches leaves its layers without gradients: DDP must expect unused parameters."""
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    run([sys.executable, str(WORKER), str(single), "moe"], WORKER.parent)
    run([*launch("torchrun", double), "moe"], WORKER.parent)
    ranks = [load_file(str(double / f"rank{r}.safetensors")) for r in (0, 1)]
    alone = load_file(str(single / "rank0.safetensors"))
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    for name, tensor in alone.items():
        torch.testing.assert_close(ranks[0][name], tensor, rtol=0, atol=1e-4)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_cpu_processes_train_like_one_process_on_the_global_batch(tmp_path, launcher):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    run([sys.executable, str(WORKER), str(single)], WORKER.parent)
    run(launch(launcher, double), WORKER.parent)

    ranks = [load_file(str(double / f"rank{r}.safetensors")) for r in (0, 1)]
    alone = load_file(str(single / "rank0.safetensors"))
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP kept the replicas identical
    # Same global batch, so the same trajectory as one process (up to float summation order).
    for name, tensor in alone.items():
        torch.testing.assert_close(ranks[0][name], tensor, rtol=0, atol=1e-4)
    metrics = [json.loads((double / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((single / "rank0.json").read_text())
    assert metrics[0]["processes"] == 2 and one["processes"] == 1
    assert metrics[0]["tokens"] == one["tokens"]
    # Each process saw half of every global batch.
    assert metrics[0]["local_sequences"] == metrics[1]["local_sequences"] == one["local_sequences"] // 2
    assert (double / "run" / "model" / "model.safetensors").is_file()
