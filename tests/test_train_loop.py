"""The loop's machinery (sdlite/data/samplers.py, training/optim.py, metrics.py): data order,
learning-rate schedule, EMA, checkpoints, metrics."""

import json

import pytest
import torch
from accelerate import Accelerator

from sdlite.data.samplers import StepSampler
from training import checkpoint
from training.checkpoint import checkpoints, find_resume, load_checkpoint, save_checkpoint
from training.metrics import Metrics
from training.optim import EMA, make_lr_schedule, make_optimizer


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def global_batches(num_processes, batch_size, accumulation, steps=6, start=0, **kw):
    """The items each step sees, whatever the split into processes and micro-steps."""
    samplers = [
        StepSampler(
            10,
            batch_size,
            seed=0,
            max_steps=steps,
            start_step=start,
            num_processes=num_processes,
            process_index=r,
            accumulation_steps=accumulation,
            **kw,
        )
        for r in range(num_processes)
    ]
    iterators = [iter(s) for s in samplers]
    out = []
    for _ in range(start, steps):
        step = []
        for _ in range(accumulation):
            for it in iterators:  # micro-step a: process 0, then 1, ...: position order
                step += next(it)
        out.append(step)
    assert all(next(it, None) is None for it in iterators)
    return out


def test_a_steps_global_batch_is_the_same_for_any_split_into_processes_and_accumulation():
    one = global_batches(1, 4, 1)
    assert global_batches(2, 2, 1) == one == global_batches(1, 2, 2) == global_batches(2, 1, 2)
    assert len({i for i, _ in one[0] + one[1]}) == 8  # an epoch (2 steps of 4 of 10 items) has no repeats


def test_data_order_is_a_function_of_seed_and_epoch_so_resuming_needs_no_skipping():
    full = global_batches(2, 2, 1, steps=7, random_flip=True)
    assert global_batches(2, 2, 1, steps=7, start=4, random_flip=True) == full[4:]
    sampler = StepSampler(10, 4, seed=0, max_steps=7)
    order = sampler.epochs.epoch_order
    assert sampler.steps_per_epoch == 2 and not torch.equal(order(0), order(1))
    assert torch.equal(StepSampler(10, 4, seed=0, max_steps=1).epochs.epoch_order(3), order(3))
    assert not torch.equal(StepSampler(10, 4, seed=1, max_steps=1).epochs.epoch_order(0), order(0))
    flips = [f for step in full for _, f in step]
    assert 0 < sum(flips) < len(flips)
    assert not any(f for step in global_batches(1, 4, 1) for _, f in step)


def test_too_little_data_for_one_global_batch_fails_with_the_numbers():
    with pytest.raises(
        ValueError, match=r"10 training items .* global batch of 12 \(batch 3 x 2 processes x 2"
    ):
        StepSampler(10, 3, seed=0, max_steps=1, num_processes=2, accumulation_steps=2)


def test_the_learning_rate_schedule_counts_optimizer_steps_whatever_the_accumulation():
    """Stepped by hand on synced steps only (never prepared by accelerate, which would step it once per
    process), the schedule after k optimizer steps is the same for any accumulation."""
    lrs = {}
    for accumulation in (1, 3):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        model = torch.nn.Linear(2, 1)
        optimizer = make_optimizer(model.parameters(), lr=1.0)
        schedule = make_lr_schedule(optimizer, "cosine", warmup_steps=2, max_steps=6)
        model, optimizer = accelerator.prepare(model, optimizer)
        trace = []
        for _ in range(6):
            for _ in range(accumulation):
                with accelerator.accumulate(model):
                    accelerator.backward(model(torch.ones(1, 2)).sum())
                    if accelerator.sync_gradients:
                        optimizer.step()
                        schedule.step()
                        optimizer.zero_grad(set_to_none=True)
            trace.append(schedule.get_last_lr()[0])
        lrs[accumulation] = trace
    assert lrs[1] == lrs[3]
    assert (
        lrs[1][0] == pytest.approx(0.5) and lrs[1][1] == pytest.approx(1.0) and lrs[1][-1] == pytest.approx(0)
    )


def test_8bit_adam_without_bitsandbytes_says_how_to_get_it():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install bitsandbytes"):
            make_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, use_8bit=True)
    else:
        pytest.skip("bitsandbytes is installed")


def test_ema_follows_diffusers_warmup_and_swaps_in_without_copies():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])  # decay_1 = min(0.9, 2/11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 2 / 11))
    raw, shadow = p.data_ptr(), ema.shadow[0].data_ptr()
    with ema.swapped_into([p]):
        assert torch.allclose(p, torch.full((3,), 1 - 2 / 11)) and p.data_ptr() == shadow
    assert p.data_ptr() == raw and torch.equal(p, torch.ones(3))


def train_some(model, optimizer, schedule, ema, steps):
    for _ in range(steps):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model.parameters())


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = make_optimizer(model.parameters(), lr=1e-2)
    return model, optimizer, make_lr_schedule(optimizer, "cosine", 1, 10), EMA(model.parameters(), 0.99)


def test_a_checkpoint_restores_weights_optimizer_schedule_ema_and_rng(accelerator, tmp_path):
    model, optimizer, schedule, ema = make()
    train_some(model, optimizer, schedule, ema, 3)
    path = save_checkpoint(accelerator, tmp_path, 3, {"net": model}, optimizer, schedule, ema)
    assert path.name == "checkpoint-3" and (path / "COMPLETE").is_file()
    train_some(model, optimizer, schedule, ema, 2)
    expected = [p.detach().clone() for p in model.parameters()] + [s.clone() for s in ema.shadow]

    model2, optimizer2, schedule2, ema2 = make(seed=1)
    state = load_checkpoint(
        accelerator, find_resume(tmp_path, "latest"), {"net": model2}, optimizer2, schedule2, ema2
    )
    assert state["step"] == 3 and schedule2.last_epoch == 3 and ema2.updates == 3
    train_some(model2, optimizer2, schedule2, ema2, 2)  # same torch RNG stream as after the save
    for a, b in zip(expected, [p.detach() for p in model2.parameters()] + ema2.shadow):
        assert torch.equal(a, b)


def test_checkpoints_rotate_and_a_crash_while_writing_leaves_no_complete_checkpoint(
    accelerator, tmp_path, monkeypatch
):
    model, optimizer, schedule, ema = make()
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, {"net": model}, optimizer, schedule, ema, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

    class Killed(BaseException):
        """Stands in for SIGKILL mid-write: nothing in the saver may catch it or clean up after it (a
        write error that the saver sees, a full disk, is tests/test_checkpoint_faults.py's)."""

    def crash(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(Killed):
        save_checkpoint(accelerator, tmp_path, 4, {"net": model}, optimizer, schedule, ema, keep=2)
    assert (tmp_path / "checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert find_resume(tmp_path, "latest").name == "checkpoint-3"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume(tmp_path, str(tmp_path / "checkpoint-4.tmp"))
    monkeypatch.undo()
    save_checkpoint(accelerator, tmp_path, 4, {"net": model}, optimizer, schedule, ema, keep=2)
    assert not (tmp_path / "checkpoint-4.tmp").exists()  # the crash's leftovers are cleared
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((tmp_path / "checkpoint-4" / "state.json").read_text())["step"] == 4
    assert find_resume(tmp_path / "empty", "latest") is None and find_resume(tmp_path, None) is None


def test_metrics_report_means_and_throughput(accelerator):
    metrics = Metrics(accelerator, images_per_step=8)
    for value in (1.0, 2.0, 3.0):
        metrics.add(loss=torch.tensor(value))
    logs = metrics.report(step=3, lr=0.1)
    assert logs["loss"] == pytest.approx(2.0) and logs["lr"] == 0.1 and logs["images_per_second"] > 0
    assert metrics.steps == 0 and metrics.sums == {}
