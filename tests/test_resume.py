"""Resuming: which config changes are allowed, a new learning rate that really reaches the optimizer, a
model that does not fit, and a corrupt newest checkpoint passed over for the one before."""

import json

import pytest
import torch
from safetensors.torch import load_file

from training.accelerator import setup_accelerator
from training.checkpoint import CheckpointError, CorruptCheckpointError, save_checkpoint
from training.optim import EMA, make_lr_schedule, make_optimizer
from training.resume import ResumeConfigError, compare_configs, resume

CONFIG = {"preset": "tiny", "seed": 0, "train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 10,
          "log_every": 5, "train_data_dir": "data/shapes/train", "lora_rank": 4}  # fmt: skip


def test_max_steps_and_cadence_may_change_on_resume_but_data_batch_model_and_seed_may_not():
    new = dict(CONFIG, max_steps=20, log_every=1, train_batch_size=16, seed=1, preset="small", lora_rank=8)
    changes = compare_configs(CONFIG, new)
    assert changes.allowed == {"max_steps": (10, 20), "log_every": (5, 1)}
    assert set(changes.refused) == {"train_batch_size", "seed", "preset", "lora_rank"}
    assert "seed" in compare_configs(CONFIG, new, allow=["seed"]).allowed
    assert compare_configs(CONFIG, dict(CONFIG, brand_new_key=1)).refused == {}  # unknown to the checkpoint
    assert compare_configs(CONFIG, dict(CONFIG, new_key=1), allow=()).allowed == {}


def test_the_same_data_folder_spelt_differently_is_not_a_change(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = dict(CONFIG, train_data_dir=str(tmp_path / "data"))
    assert compare_configs(saved, dict(CONFIG, train_data_dir="data")).refused == {}


class Run:
    """A one-layer model, its optimizer (cosine schedule with warm-up) and EMA, as a trainer holds them."""

    def __init__(self, tmp_path, lr=1e-3, size=3, seed=0):
        torch.manual_seed(seed)
        self.acc = setup_accelerator(tmp_path, report_to=None)
        self.model = torch.nn.Linear(size, 2)
        self.optimizer = make_optimizer(self.model.parameters(), lr=lr)
        self.schedule = make_lr_schedule(self.optimizer, "cosine", 2, 10)
        self.ema = EMA(self.model.parameters(), 0.9)

    def train(self, steps):
        for _ in range(steps):
            self.model(torch.randn(4, self.model.in_features)).pow(2).mean().backward()
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad()
            self.ema.update(self.model.parameters())

    def save(self, out, step, config=CONFIG):
        return save_checkpoint(self.acc, out, step, {"net": self.model}, self.optimizer, self.schedule,
                               self.ema, config=config)  # fmt: skip

    def resume(self, out, which="latest", config=CONFIG, **kwargs):
        return resume(self.acc, out, which, {"net": self.model}, self.optimizer, self.schedule, self.ema,
                      config=config, base_lrs=list(self.schedule.base_lrs), **kwargs)  # fmt: skip


def test_a_changed_learning_rate_is_refused_unless_allowed_and_then_reaches_the_optimizer(tmp_path):
    first = Run(tmp_path)
    first.train(4)
    first.save(tmp_path, 4)
    new = dict(CONFIG, learning_rate=5e-4)
    with pytest.raises(ResumeConfigError, match=r"learning_rate: 0.001 -> 0.0005.*--allow_config_change "
                                                r"learning_rate"):  # fmt: skip
        Run(tmp_path, lr=5e-4).resume(tmp_path, config=new)
    logs, resumed = [], Run(tmp_path, lr=5e-4)
    found = resumed.resume(tmp_path, config=new, allow=["learning_rate"], log=logs.append)
    assert found.state["step"] == 4 and logs == ["resume changes learning_rate: 0.001 -> 0.0005"]
    factor = first.optimizer.param_groups[0]["lr"] / 1e-3  # the cosine schedule's position after 4 steps
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * factor)
    resumed.train(1)
    first.train(1)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(first.optimizer.param_groups[0]["lr"] / 2)
    assert resumed.schedule.get_last_lr()[0] == resumed.optimizer.param_groups[0]["lr"]


def test_a_checkpoint_of_another_model_fails_naming_tensor_and_shapes(tmp_path):
    Run(tmp_path).save(tmp_path, 1)
    with pytest.raises(ResumeConfigError, match=r"preset: 'tiny' -> 'small'"):
        Run(tmp_path, size=5).resume(tmp_path, config=dict(CONFIG, preset="small"))
    with pytest.raises(CheckpointError, match=r"net.safetensors'? does not fit.*weight is \(2, 3\) there but "
                                              r"\(2, 5\) in this run's model.*another preset"):  # fmt: skip
        Run(tmp_path, size=5).resume(tmp_path, config=dict(CONFIG, preset="small"), allow=["preset"])


def corrupt(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\x13garbage" * 10)


@pytest.mark.parametrize("file,how", [("rng-0.safetensors", "garbage"), ("ema.safetensors", "truncated"),
                                      ("net.safetensors", "garbage"), ("optimizer.pt", "truncated"),
                                      ("optimizer.pt", "garbage"), ("state.json", "garbage")])  # fmt: skip
def test_a_corrupt_file_in_the_newest_checkpoint_falls_back_to_the_one_before(tmp_path, file, how):
    run = Run(tmp_path)
    for step in (1, 2, 3):
        run.train(1)
        run.save(tmp_path, step)
    corrupt(tmp_path / "checkpoint-3" / file, how)
    logs, resumed = [], Run(tmp_path, seed=1)
    found = resumed.resume(tmp_path, log=logs.append)
    assert found.checkpoint.name == "checkpoint-2" and found.state["step"] == 2
    assert f"checkpoint-3/{file}" in logs[0] and "resuming from the one before, checkpoint-2" in logs[0]
    saved = load_file(tmp_path / "checkpoint-2" / "net.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in resumed.model.state_dict().items())
    with pytest.raises(
        CorruptCheckpointError, match=rf"cannot resume from .*checkpoint-3.*{file}'? is corrupt"
    ):
        Run(tmp_path).resume(tmp_path, str(tmp_path / "checkpoint-3"))


def test_when_no_checkpoint_loads_the_error_says_so(tmp_path):
    run = Run(tmp_path)
    run.save(tmp_path, 1)
    (tmp_path / "checkpoint-1" / "ema.safetensors").unlink()
    with pytest.raises(
        CorruptCheckpointError, match=r"no checkpoint in .* loads.*ema.safetensors'? is missing"
    ):
        Run(tmp_path).resume(tmp_path)


def test_the_checkpoint_records_the_config_it_was_trained_with(tmp_path):
    path = Run(tmp_path).save(tmp_path, 1, config=dict(CONFIG, learning_rate=2e-3))
    assert json.loads((path / "config.json").read_text())["learning_rate"] == 2e-3
