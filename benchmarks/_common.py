"""Shared helpers of the benchmark scripts: profiles, synthetic pair batches, timing, memory.

Not part of the package: the scripts put the repository root on ``sys.path`` and import this
file as a sibling module.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# bf16 dense peak of one H100 SXM (989 TFLOP/s spec sheet); the issue measures ~790-800 in practice.
DEFAULT_PEAK_FLOPS = 989e12

# key=value overrides that turn the paper-scale default into a random-init SD-1.5-sized model that
# builds offline: the SD AutoencoderKL first stage (64x64x4 latents of 512 px images, so the UNet
# takes 4 + 4 + 1 = 9 channels), the SD-1.5 UNet of default.yaml, a random FaceNet encoder. Random
# weights also under an experiment file that names real ones (speed does not depend on them); each
# key only where the configured variant takes it (`keys_the_variants_take`).
SD15_OVERRIDES = (
    "model.identity_encoder.params.weights=null",
    "model.identity_encoder.params.allow_random_init=true",
    "model.first_stage.params.path=null",
    "model.first_stage.params.random_init=true",
    "model.backbone.params.pretrained=null",
)
PROFILE_IMAGE_SIZE = {"tiny": 32, "sd15": 512}
# H100 SXM HBM3 (spec sheet): the memory side of the --traffic roofline.
DEFAULT_BANDWIDTH = 3.35e12


_IMPORTED = time.perf_counter()


def progress(message: str) -> None:
    """``message`` on stderr at once, after the seconds since this module's import: a run that a
    time cap cuts off prints its table never, and these lines say where its time went."""
    print(f"[{time.perf_counter() - _IMPORTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def add_device_arguments(parser, peak_flops_help: str) -> None:
    """``--peak-flops`` and ``--bandwidth``: the device a figure is taken against (MFU, roofline)."""
    parser.add_argument("--peak-flops", type=float, default=DEFAULT_PEAK_FLOPS,
                        help=f"{peak_flops_help} (default 989e12, H100 bf16 dense)")
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH,
                        help="--traffic: device memory bandwidth, bytes/s (default 3.35e12, H100 HBM3)")


OVERRIDE_HELP = ("config files (ablations/X.yaml, experiments/Y.yaml: layered on the profile in order) and "
                 "key=value overrides, as the id2face CLI takes them (repeatable)")


def profile_config(profile: str, overrides: list[str] | tuple[str, ...] = ()):
    """The profile's resolved config with ``overrides`` as the CLI takes its arguments: config files
    (an ablation, an experiment) layered on the profile in order, then the ``key=value`` ones. A
    config that does not load stops the script with its one-line error."""
    from id2face.config import load_config, split_args
    from id2face.errors import UserError

    if profile not in ("tiny", "sd15"):
        raise SystemExit(f"unknown profile {profile!r}: tiny, sd15")
    files, keys = split_args(list(overrides))
    try:
        if profile == "tiny":
            return load_config(["tiny", *files], keys)
        # Random weights where the chosen variants take the switch (an experiment may swap one in).
        random_init = keys_the_variants_take(load_config(files, keys).model, SD15_OVERRIDES)
        return load_config(files, [*random_init, *keys])
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


def keys_the_variants_take(model_cfg, keys) -> list[str]:
    """``keys`` (key=value) less those that set a ``model.<role>.params.<param>`` which the role's
    configured variant in ``model_cfg`` does not declare."""
    from id2face.registry import MODEL_ROLES, variant_name

    def taken(key: str) -> bool:
        path = key.split("=", 1)[0].split(".")
        if len(path) != 4 or path[0] != "model" or path[2] != "params" or path[1] not in MODEL_ROLES:
            return True
        return MODEL_ROLES[path[1]].declares(variant_name(model_cfg[path[1]]), path[3])

    return [key for key in keys if taken(key)]


def build_model(profile: str, device: torch.device, overrides=(), seed: int = 0):
    """(ID2Face, resolved config), the model on ``device`` in train mode."""
    from id2face.errors import UserError
    from id2face.model import ID2Face

    cfg = profile_config(profile, overrides)
    torch.manual_seed(seed)
    try:
        model = ID2Face.from_config(cfg.model).to(device)
    except UserError as err:  # e.g. a component name no registry knows
        raise SystemExit(f"error: {err}") from None
    return model, cfg


def context_tokens(model) -> int:
    """Tokens of the UNet's context: the identity tokens and the attribute encoder's own count
    (its built module's, so a variant without a ``num_tokens`` param, ``none``, counts too)."""
    return model.identity_tokens.num_tokens + model.attribute_encoder.num_tokens


def first_stage_description(model) -> str:
    stage = getattr(model.first_stage, "encoder_stage", model.first_stage)  # a DecoderSwap encodes with it
    name = getattr(stage, "registered_name", type(stage).__name__)
    return "sd_vae (SD-1.5 AutoencoderKL, random init)" if name == "sd_vae" else name


# Who encodes and decodes around the UNet: the first stage (own), an untrained TAESD-architecture
# autoencoder decoding (taesd: `anonymize --tiny-decoder`), or encoding and decoding (taesd_both:
# `--tiny-decoder --tiny-encoder`). The cost is that of trained weights; the pictures are not.
FIRST_STAGE_VARIANTS = ("own", "taesd", "taesd_both")


def first_stage_variant(first_stage, variant: str, channels_last: bool = False, compile: bool = False):
    """``first_stage`` with the coders of ``variant``, one of ``FIRST_STAGE_VARIANTS``."""
    if variant == "own":
        return first_stage
    from id2face.inference import with_tiny_decoder

    return with_tiny_decoder(first_stage, None, also_encodes=variant == "taesd_both", channels_last=channels_last,
                             compile=compile, random_init=True)


def face_batch(n: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n,3,S,S) in [-1,1], masks (n,1,S,S) in {0,1}): random pixels, a central inner-face box.

    Step time does not depend on pixel content; the mask covers the inner-face region of an
    aligned crop (rows 30-80 %, columns 25-75 %).
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, int(0.3 * size):int(0.8 * size), int(0.25 * size):int(0.75 * size)] = 1
    return images.to(device), masks.to(device)


def pair_batch(pairs: int, size: int, device: torch.device, seed: int = 0) -> dict:
    a_img, a_mask = face_batch(pairs, size, device, seed)
    b_img, b_mask = face_batch(pairs, size, device, seed + 1)
    ident = torch.arange(pairs, device=device)
    return {"a": {"image": a_img, "mask": a_mask, "identity": ident},
            "b": {"image": b_img, "mask": b_mask, "identity": ident}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def state_bytes(params: list[torch.nn.Parameter]) -> int:
    """Parameters + gradients + AdamW's two moments (fp32 master weights: 4 copies)."""
    return 4 * sum(p.numel() * p.element_size() for p in params)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device, out: dict):
    """``out["peak"]``: bytes above the level at entry, at the body's peak.

    CUDA: exact (``max_memory_allocated``). CPU: process RSS sampled every ~1 ms by a thread, so an
    approximation (the allocator may keep freed blocks resident, or reuse them unseen).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - start
        return
    start = _rss_bytes()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["peak"] = peak[0] - start


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def saved_for_backward(fn: Callable[[], object]) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs (each storage once, by its C++ identity,
    so it also counts on the meta device); ``fn``'s result is dropped before returning."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def kernel_times(fn: Callable[[], object], device: torch.device) -> dict[str, tuple[int, float]]:
    """``{name: (calls, seconds)}`` of one call of ``fn`` under ``torch.profiler``. CUDA: each GPU
    kernel's device time (what the step spends on the GPU, by kernel); CPU: each aten op's self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    times = {}
    for event in prof.key_averages():
        if cuda and event.device_type == DeviceType.CUDA:
            seconds = getattr(event, "self_device_time_total", None)
            seconds = (event.self_cuda_time_total if seconds is None else seconds) / 1e6
        elif not cuda and event.key.startswith("aten::"):
            seconds = event.self_cpu_time_total / 1e6
        else:
            continue
        if seconds > 0:
            times[event.key] = (int(event.count), seconds)
    return times


class HostReadCounter(TorchDispatchMode):
    """Ops dispatched by name (``counts``), and ``host_reads``: those that would make the host wait for
    a GPU (a value read to the host; an output whose size depends on the data: nonzero, NMS,
    boolean-mask indexing), counted on any device, a CPU included."""

    WAITING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "torchvision.nms")

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        masked = name in ("aten.index", "aten.index_put") and any(
            torch.is_tensor(index) and index.dtype == torch.bool for index in (args[1] or ()) if index is not None)
        self.host_reads += masked or name in self.WAITING_OPS
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """Where one call of ``fn`` made the host wait for the GPU (``torch.cuda.set_sync_debug_mode``);
    not the "prototype feature" notice the first switch to "warn" prints."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "called a synchronizing" in str(w.message)]


class SpanTimer:
    """Named spans of one step, summed per name. CUDA: the GPU time between events recorded at a
    span's start and end (its kernels, plus any gaps in which the GPU waited for launches: what the
    span costs on the GPU timeline). CPU: the host clock (execution is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open: dict[str, list] = {}
        self._closed: dict[str, list] = {}

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self, name: str) -> None:
        self._open.setdefault(name, []).append(self._mark())

    def end(self, name: str) -> None:
        self._closed.setdefault(name, []).append((self._open[name].pop(), self._mark()))

    @contextmanager
    def span(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    @contextmanager
    def attached(self, forwards: list[tuple[str, torch.nn.Module]] = (), methods: list[tuple[str, object, str]] = ()):
        """Within the block, each forward call of a ``(label, module)`` and each call of a
        ``(label, object, method name)`` is a span of that label."""
        handles = [h for label, module in forwards
                   for h in (module.register_forward_pre_hook(lambda *_, label=label: self.begin(label)),
                             module.register_forward_hook(lambda *_, label=label: self.end(label)))]
        for label, owner, name in methods:
            setattr(owner, name, self._timed(label, getattr(owner, name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for _, owner, name in methods:
                delattr(owner, name)  # the instance attribute set above: the class method shows again

    def _timed(self, label: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with self.span(label):
                return fn(*args, **kwargs)
        return call

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self._closed.items()}
        return {k: sum(b - a for a, b in v) for k, v in self._closed.items()}


class NullTimer:
    """SpanTimer's interface, timing nothing (the timed steps)."""

    def span(self, name: str):
        return nullcontext()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` host calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * median(times)


def sample_photos() -> list:
    """Natural RGB photos (uint8 arrays): scikit-image's coffee, chelsea, astronaut and rocket;
    where it is not installed (a bare GPU machine), smooth random colour fields of 512 x 512 (PNG
    sizes and decode times differ from photos')."""
    import numpy as np

    try:
        from skimage import data
    except ImportError:
        from PIL import Image

        rng = np.random.default_rng(0)
        return [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
            (512, 512), Image.BICUBIC)) for _ in range(4)]
    return [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def print_json(figures: dict) -> None:
    print(json.dumps(figures, sort_keys=True))
