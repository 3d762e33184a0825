"""FLOPs of a training step counted on a meta copy, and the callback that logs a run's images/s and MFU."""
import re
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from id2face.flops import images_in, meta_copy, training_step_flops
from id2face.training import TrainingThroughput

from test_model import pair_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:tiny identity encoder has no weights")


def counted_on_the_real_step(model, batch) -> int:
    # FlopCounterMode has no formula for the CPU's fused attention kernel; the math kernel's matmuls
    # are what the meta device runs (and what the formulas of CUDA's fused kernels count).
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model.training_losses(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_the_meta_count_is_the_real_steps_and_leaves_the_model_and_generators_as_they_were():
    model, batch = tiny_model(), pair_batch(num_pairs=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cpu_rng = torch.random.get_rng_state()

    flops = training_step_flops(model, batch)

    assert torch.equal(torch.random.get_rng_state(), cpu_rng)  # the run draws the same noise
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.grad is None and torch.equal(p, before[name]), name
    # diffusers' scheduler moves its table to the device of what it is given: the copy's, not ours
    assert model.scheduler.scheduler.alphas_cumprod.device.type == "cpu"
    assert flops.total == counted_on_the_real_step(model, batch) > 0
    # by module as the counter tracks them (the harmonizer's gates run inside the UNet: in both)
    assert max(flops.by_role, key=flops.by_role.get) == "UNetBackbone"
    assert 0.9 * flops.total < flops.by_role["UNetBackbone"] < flops.total
    assert images_in(batch) == 6
    # per image it does not depend on the batch (up to the alignment's N x N statistics)
    assert training_step_flops(model, pair_batch(num_pairs=6)).total / 12 == pytest.approx(flops.total / 6, rel=1e-3)


def test_a_compiled_unet_counts_as_its_eager_self_without_compiling(fresh_dynamo):
    model, batch = tiny_model(), pair_batch()
    eager = training_step_flops(model, batch).total
    model.backbone.unet.compile()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert training_step_flops(model, batch).total == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
    copied = meta_copy(model)
    assert all(p.device.type == "meta" for p in copied.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


class RecordingLogger:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


class Clock:
    """Each reading is ``tick`` seconds after the last."""

    def __init__(self, tick: float):
        self.tick, self.now, self.readings = tick, 0.0, 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += self.tick
        return self.now


def trainer_stub(world_size=1, log_every_n_steps=2):
    return SimpleNamespace(is_global_zero=True, loggers=[RecordingLogger()], sanity_checking=False, global_step=0,
                           log_every_n_steps=log_every_n_steps, world_size=world_size, precision="bf16-mixed",
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def run_batches(callback, trainer, steps, pairs=4, validate_after=()):
    batch = {"a": {"image": torch.zeros(pairs, 3, 8, 8)}, "b": {"image": torch.zeros(pairs, 3, 8, 8)}}
    validated = set()
    for step in steps:
        callback.on_train_batch_start(trainer, None, batch, 0)
        trainer.global_step = step  # after the optimiser step, as Lightning has it in on_train_batch_end
        callback.on_train_batch_end(trainer, None, None, batch, 0)
        if step in validate_after and step not in validated:
            validated.add(step)
            callback.on_validation_start(trainer, None)
            callback.on_validation_end(trainer, None)


def test_the_callback_logs_images_per_second_and_mfu_at_the_logging_steps_only(capsys):
    clock = Clock(tick=2.0)
    callback = TrainingThroughput(peak_flops=1e12, clock=clock)
    callback.flops_per_image, callback._counted = 1e11, True  # counted on the first batch otherwise
    trainer = trainer_stub(world_size=2, log_every_n_steps=2)
    callback.setup(trainer, None, "fit")
    run_batches(callback, trainer, steps=range(1, 8))  # 4 pairs = 8 images a batch

    logged = trainer.loggers[0].logged
    # the clock starts after the first batch; then one interval per logging step
    assert [step for step, _ in logged] == [2, 4, 6]
    assert clock.readings == 4  # a read (and, on a GPU, a synchronisation) only there
    first, later = logged[0][1], logged[1][1]
    assert first["throughput/images_per_s"] == pytest.approx(2 * 8 / 2.0)  # one batch of 8 in 2 s, 2 devices
    assert later["throughput/images_per_s"] == pytest.approx(2 * 16 / 2.0)
    assert later["throughput/tflops_per_s"] == pytest.approx(1e11 * 8 / 1e12)
    assert later["throughput/mfu"] == pytest.approx(0.8)
    # the line at the end: 8 + 16 + 16 images a device in 6 s, on 2 devices
    callback.on_train_end(trainer, None)
    assert capsys.readouterr().out == ("throughput: 13.3 images/s over steps 2-6, 0.667 TFLOP/s a device, "
                                       "MFU 66.7 %\n")


def test_validation_and_accumulated_batches_do_not_bend_the_figure():
    clock = Clock(tick=1.0)
    callback = TrainingThroughput(clock=clock)  # a CPU: no peak, no mfu
    callback.flops_per_image, callback._counted = 5e9, True
    trainer = trainer_stub(log_every_n_steps=4)
    callback.setup(trainer, None, "fit")
    assert callback.peak_flops is None
    # two batches per optimiser step (accumulate_grad_batches=2): global_step 0, 1, 1, 2, 2, ...
    run_batches(callback, trainer, steps=[0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8], validate_after={5})
    (step_4, at_4), (step_8, at_8) = trainer.loggers[0].logged
    assert (step_4, step_8) == (4, 8) and "throughput/mfu" not in at_4
    # step 4: 7 batches after the first's end, 2 clock readings apart (1 s)
    assert at_4["throughput/images_per_s"] == pytest.approx(7 * 8 / 1.0)
    # step 8: 8 batches; the validation after step 5 took one tick, left out: 2 s of the 3 counted
    assert at_8["throughput/images_per_s"] == pytest.approx(8 * 8 / 2.0)
    assert at_8["throughput/tflops_per_s"] == pytest.approx(5e9 * 32 / 1e12)


def test_the_callback_counts_the_models_flops_on_the_first_batch_and_stays_quiet_off_rank_zero():
    model, batch = tiny_model(), pair_batch()
    trainer = trainer_stub()
    module = SimpleNamespace(model=model)
    callback = TrainingThroughput(clock=Clock(1.0))
    callback.on_train_batch_start(trainer, module, batch, 0)
    assert callback.flops_per_image == training_step_flops(model, batch).total / 4

    other_rank = TrainingThroughput(clock=Clock(1.0))
    trainer.is_global_zero = False
    run_batches(other_rank, trainer, steps=range(1, 6))
    assert other_rank.flops_per_image is None and trainer.loggers[0].logged == []


def test_a_model_the_meta_device_cannot_run_still_trains_and_logs_its_images_per_second():
    class ReadsBack(torch.nn.Module):  # a user's component that reads a value to the host
        def training_losses(self, batch):
            scale = batch["a"]["image"].abs().max().item()
            return {"loss": batch["a"]["image"].sum() * scale}

    trainer = trainer_stub(log_every_n_steps=1)
    callback = TrainingThroughput(peak_flops=1e12, clock=Clock(1.0))
    batch = {"a": {"image": torch.ones(2, 3, 4, 4)}, "b": {"image": torch.ones(2, 3, 4, 4)}}
    with pytest.warns(UserWarning, match=r"FLOPs could not be counted on the meta device .*images/s only"):
        callback.on_train_batch_start(trainer, SimpleNamespace(model=ReadsBack()), batch, 0)
    callback.on_train_batch_start(trainer, SimpleNamespace(model=ReadsBack()), batch, 0)  # tried once only
    run_batches(callback, trainer, steps=[1, 2])
    assert trainer.loggers[0].logged == [(2, {"throughput/images_per_s": 8.0})]  # 8 images in 1 s


def test_the_peak_comes_from_the_config_or_lightnings_table(monkeypatch):
    assert TrainingThroughput(peak_flops="989e12").peak_flops == 989e12  # YAML reads 989e12 as a string
    import lightning.fabric.utilities.throughput as lightning_throughput

    asked = []
    monkeypatch.setattr(lightning_throughput, "get_available_flops",
                        lambda device, dtype: asked.append((device.type, dtype)) or 7e14)
    trainer = trainer_stub()
    trainer.strategy.root_device = torch.device("cuda", 0)
    callback = TrainingThroughput()
    callback.setup(trainer, None, "fit")
    assert callback.peak_flops == 7e14 and asked == [("cuda", torch.bfloat16)]


def test_a_training_run_logs_its_throughput_to_tensorboard(tmp_path, capsys):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from id2face.config import load_config
    from id2face.training import fit
    from test_training import FAST

    started = time.perf_counter()
    folder = fit(load_config(["tiny"], [f"run.root={tmp_path}", "trainer.max_steps=5", *FAST,
                                        "trainer.log_every_n_steps=2", "run.peak_flops=2e12"]))
    wall = time.perf_counter() - started
    scalars = EventAccumulator(str(folder / "tb")).Reload()
    rate, tflops, mfu = (scalars.Scalars(f"throughput/{name}") for name in ("images_per_s", "tflops_per_s", "mfu"))
    assert [e.step for e in rate] == [e.step for e in mfu] == [2, 4]
    images_per_batch = 2 * 2  # data.batch_size=2 pairs, both directions
    # the intervals (steps 2, then 3-4) fit in the run's wall time
    assert 0 < images_per_batch / rate[0].value + 2 * images_per_batch / rate[1].value < wall
    flops_per_image = tflops[1].value * 1e12 / rate[1].value
    assert flops_per_image == pytest.approx(training_step_flops(tiny_model(), pair_batch(2)).total / 4, rel=1e-3)
    assert mfu[1].value == pytest.approx(tflops[1].value * 1e12 / 2e12, rel=1e-4)
    # and one line at the end over both intervals: their images over their summed seconds
    overall = 3 * images_per_batch / (images_per_batch / rate[0].value + 2 * images_per_batch / rate[1].value)
    line = re.search(r"throughput: ([\d.]+) images/s over steps 2-4, ([\d.]+) TFLOP/s a device, MFU ([\d.]+) %",
                     capsys.readouterr().out)
    assert line and float(line[1]) == pytest.approx(overall, abs=0.1)
    assert float(line[3]) == pytest.approx(100 * float(line[2]) * 1e12 / 2e12, abs=0.1)


def test_model_flops_leave_out_what_gradient_checkpointing_recomputes():
    batch = pair_batch()
    plain = training_step_flops(tiny_model(), batch).total
    checkpointed = tiny_model("model.backbone.params.gradient_checkpointing=true")
    executed = training_step_flops(checkpointed, batch).total
    assert executed > 1.15 * plain  # the UNet's forward runs twice
    assert training_step_flops(checkpointed, batch, recomputation=False).total == plain
    assert checkpointed.backbone.unet.is_gradient_checkpointing  # cleared in the copy only
