"""The accelerate configs of configs/accelerate/ (docs/scale-out.md): they parse, sharded ones are refused
clearly, and a two-node launch (two machine ranks on this machine, one process each) trains."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from sdlite.data.shapes import write_dataset
from sdlite.data.streaming import write_shards
from training.accelerator import setup_accelerator

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_the_configs_are_the_expected_ones():
    names = {p.stem for p in CONFIGS}
    assert {"cpu-2proc", "ddp", "multi-node", "fsdp", "deepspeed-zero2"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_config_loads_as_accelerate_reads_it(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
    kind = DistributedType(config.distributed_type)
    if kind == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if kind == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharded_launch_is_refused_before_anything_is_built(variable, tmp_path, monkeypatch):
    # accelerate launch sets these; on CPUs accelerate would otherwise quietly run the config as DDP.
    monkeypatch.setenv(variable, "true")
    with pytest.raises(NotImplementedError, match="docs/scale-out.md"):
        setup_accelerator(tmp_path, report_to=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_each_train_one_streamed_run(tmp_path):
    write_dataset(tmp_path / "folder", count=16, seed=0)
    write_shards(tmp_path / "folder", tmp_path / "shards", 4)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    train = [str(ROOT / "training" / "train.py"), "--train_data_dir", str(tmp_path / "shards"),
             "--streaming", "true", "--max_steps", "2", "--train_batch_size", "2", "--report_to", "none",
             "--checkpoint_every", "0", "--ema_decay", "none", "--log_every", "1",
             "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    port = str(free_port())

    def start_node(rank: int) -> subprocess.Popen:
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch",
                  "--config_file", str(ROOT / "configs" / "accelerate" / "multi-node.yaml"),
                  "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                  "--main_process_ip", "127.0.0.1", "--main_process_port", port]  # fmt: skip
        command = [*launch, *train, "--output_dir", str(tmp_path / f"node{rank}")]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip

    nodes = [start_node(0), start_node(1)]
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # ours, if still running after a timeout
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-5000:]
    assert "global batch 4" in logs[0]  # 2 nodes x 1 process x batch 2
    assert (tmp_path / "node0" / "final" / "unet").is_dir()  # written by the main process, on node 0
    assert not (tmp_path / "node1" / "final").exists()


def test_the_gpu_benchmark_counts_the_unet_flops_of_attention_and_backward():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import unet_flops
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdlite.presets import get_preset

    forward, both = unet_flops("tiny", 8, backward=False), unet_flops("tiny", 8)
    assert 2.5 < both / forward < 3.5  # backward ~ 2 x forward: gradients of inputs and of weights
    # CPU's fused attention kernel has no FLOP formula: counted that way, attention would be missing.
    preset = get_preset("tiny")
    unet, counter = UNet2DConditionModel(**preset.config("unet")), FlopCounterMode(display=False)
    with counter:
        unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 16, 64))
    assert counter.get_total_flops() < forward
