"""CUDA behaviour of the tiny model: the CPU numbers, the speed switches, and a training step that
never waits on the host. Skipped without CUDA (conftest); the SD-1.5-sized step is in test_lit_module."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from id2face.config import load_config
from id2face.data.synthfaces import render_sample
from id2face.model import ID2Face
from id2face.registry import BACKBONES

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:tiny identity encoder has no weights")]
CUDA = torch.device("cuda")


def tiny_model(*overrides, seed=0):
    torch.manual_seed(seed)
    return ID2Face.from_config(load_config(["tiny"], list(overrides)).model)


def pair_batch(num_pairs=4, size=32, device="cpu"):
    ids = range(num_pairs)
    return {side: {k: v.to(device) for k, v in default_collate([render_sample(i, s, size) for i in ids]).items()}
            for side, s in (("a", 0), ("b", 1))}


def test_training_step_waits_on_the_host_nowhere():
    """Issue #8: no host-device synchronisation inside forward, backward and the fused AdamW step
    (a sync per step stalls the GPU queue; `.item()` belongs to logging intervals)."""
    model = tiny_model().to(CUDA).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    batch = pair_batch(device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.training_losses(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first step: lazy state (AdamW moments, cuBLAS handles)
    syncs = host_syncs(step)
    assert syncs == [], "\n".join(syncs)


def test_a_training_batch_goes_to_the_gpu_without_waiting_for_its_queued_work():
    """ID2FaceModule copies a (pinned) batch on its own stream: the host does not wait for the
    previous step's kernels, and the step's stream waits for the copy. A pageable batch copied on
    the compute stream, Lightning's default, waits for the whole queue (CUDA's API sync behaviour)."""
    import time

    from lightning.pytorch import LightningModule

    from id2face.lit_module import ID2FaceModule

    module = ID2FaceModule(load_config(["tiny"])).to(CUDA)
    batch = pair_batch(num_pairs=8, size=256)
    pinned = {side: {k: v.pin_memory() for k, v in items.items()} for side, items in batch.items()}

    def host_seconds_while_busy(transfer):
        busy = torch.randn(4096, 4096, device=CUDA)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(60):  # ~0.1-0.2 s of queued GPU work
            busy = (busy @ busy).clamp_(-1, 1)
        queued = time.perf_counter()
        moved = transfer()
        returned = time.perf_counter()
        image = moved["a"]["image"] * 1  # on the compute stream: after the copy
        torch.cuda.synchronize()
        return returned - queued, time.perf_counter() - start, image

    ours, busy_s, image = host_seconds_while_busy(lambda: module.transfer_batch_to_device(pinned, CUDA, 0))
    assert ours < 0.2 * busy_s and torch.equal(image.cpu(), batch["a"]["image"])
    stock, busy_s, _ = host_seconds_while_busy(
        lambda: LightningModule.transfer_batch_to_device(module, batch, CUDA, 0))
    assert stock > 0.5 * busy_s  # why: the pageable copy waited for the queue


def test_a_uint8_batch_becomes_the_cpu_float_batch_on_the_gpu_without_a_sync():
    from id2face.data.pixels import collate_pairs_uint8, unpack_pixels
    from id2face.lit_module import ID2FaceModule

    module = ID2FaceModule(load_config(["tiny"])).to(CUDA)
    pairs = [{side: render_sample(i, s, 64) for side, s in (("a", 0), ("b", 1))} for i in range(4)]
    packed = collate_pairs_uint8(pairs)
    pinned = {side: {k: v.pin_memory() for k, v in items.items()} for side, items in packed.items()}
    moved = module.transfer_batch_to_device(pinned, CUDA, 0)
    syncs = host_syncs(lambda: module.on_after_batch_transfer(moved, 0))
    assert syncs == [], "\n".join(syncs)
    on_gpu, on_cpu = module.on_after_batch_transfer(moved, 0), unpack_pixels(packed)
    for side in "ab":
        assert on_gpu[side]["image"].is_cuda and on_gpu[side]["image"].dtype == torch.float32
        assert torch.equal(on_gpu[side]["image"].cpu(), on_cpu[side]["image"])
        assert torch.equal(on_gpu[side]["mask"].cpu(), on_cpu[side]["mask"])


def test_ema_update_waits_on_the_host_nowhere():
    from id2face.lit_module import ID2FaceModule

    torch.manual_seed(0)
    module = ID2FaceModule(load_config(["tiny"])).to(CUDA)
    module.update_ema()  # the first: a copy
    syncs = host_syncs(module.update_ema)
    assert syncs == [], "\n".join(syncs)
    assert int(module.ema.n_averaged) == 2


@pytest.mark.parametrize("name", ["ddim", "dpm_solver"])
def test_sampler_steps_wait_on_the_host_nowhere(name):
    """A sync per sampler step empties the GPU queue 25 times a call: the scheduler steps on host
    ints, the denoiser gets device timesteps copied once."""
    from id2face.registry import SAMPLERS, SCHEDULERS

    sampler = SAMPLERS.build({"name": name, "params": {"num_inference_steps": 10}},
                             train_scheduler=SCHEDULERS.build({"name": "ddpm", "params": {}}))
    noise = torch.randn(4, 4, 32, 32, device=CUDA)
    weight = torch.randn(4, 4, 1, 1, device=CUDA) * 0.1

    def denoise(x, t):
        return torch.nn.functional.conv2d(x, weight) + t.float() * 1e-4

    sampler.sample(denoise, noise)  # first call: lazy scheduler state, cuBLAS/cuDNN handles
    syncs = host_syncs(lambda: sampler.sample(denoise, noise))
    assert syncs == [], "\n".join(syncs)


def test_anonymize_syncs_do_not_grow_with_the_sampler_steps():
    """Whatever the model's set-up waits for once a call, its sampling loop adds nothing per step."""
    model = tiny_model().to(CUDA).eval()
    batch = pair_batch(device=CUDA)["a"]

    def anonymize(steps):
        return lambda: model.anonymize(batch["image"], batch["mask"], num_inference_steps=steps)

    anonymize(2)()
    counts = {steps: len(host_syncs(anonymize(steps))) for steps in (2, 6)}
    assert counts[2] == counts[6], counts


def test_face_detection_waits_on_the_host_a_fixed_few_times(group_photo):
    """facenet-pytorch's MTCNN waits on the GPU once per candidate face (hundreds here, each behind
    whatever the sampler has queued) and a few times per pyramid scale (11 here); ours a fixed few:
    thresholds, NMS, the refinement stages' boxes, the results."""
    from facenet_pytorch import MTCNN

    from id2face.data.mtcnn import detect

    mtcnn = MTCNN(keep_all=True, select_largest=True, min_face_size=20, device=CUDA).eval()
    boxes, _ = detect(mtcnn, group_photo)
    assert len(boxes) == 4
    ours = host_syncs(lambda: detect(mtcnn, group_photo))
    theirs = host_syncs(lambda: mtcnn.detect(group_photo, landmarks=True))
    assert len(ours) <= 16, "\n".join(ours)
    assert len(theirs) > 30 * len(ours)


def _load_bench_common():
    # The benchmarks' helpers (benchmarks/_common.py, not a package module).
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_common = _load_bench_common()
host_syncs = bench_common.host_syncs


def test_kernel_times_lists_gpu_kernels_not_host_ops():
    """`train_step.py --kernel-table` reads GPU kernels' device time from torch.profiler."""
    a = torch.randn(2048, 2048, device=CUDA)
    times = bench_common.kernel_times(lambda: (a @ a).relu_(), CUDA)
    assert times and not any(name.startswith("aten::") for name in times)
    assert all(calls >= 1 and 0 < seconds < 1 for calls, seconds in times.values())


def test_anonymize_on_cuda_gives_the_cpu_faces():
    model = tiny_model().eval()
    batch = pair_batch(num_pairs=3)["a"]
    images, masks = batch["image"], batch["mask"]
    on_cpu = model.anonymize(images, masks, generator=torch.Generator().manual_seed(0), num_inference_steps=5)
    model.to(CUDA)
    on_cuda = model.anonymize(images.to(CUDA), masks.to(CUDA), generator=torch.Generator().manual_seed(0),
                              num_inference_steps=5).cpu()
    outside = masks.expand_as(images) == 0
    assert torch.equal(on_cuda[outside], images[outside])  # the outside is copied, on any device
    # TF32 convolutions on the GPU: close, not bit-equal.
    torch.testing.assert_close(on_cuda, on_cpu, rtol=0, atol=3e-2)


def tiny_unet(**switches):
    torch.manual_seed(0)
    params = dict(sample_size=16, block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, attention_head_dim=8)
    return BACKBONES.build({"name": "unet", "params": {**params, **switches}}, in_channels=9, out_channels=4,
                           cross_attention_dim=32).to(CUDA)


def unet_inputs(n=4):
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(n, 9, 16, 16, generator=g), torch.randn(n, 20, 32, generator=g)
    return sample.to(CUDA), torch.randint(0, 1000, (n,), generator=g).to(CUDA), context.to(CUDA)


@pytest.mark.parametrize("switches", [{"sdpa_backends": ["flash_attention"]},
                                      {"sdpa_backends": ["efficient_attention"]},
                                      {"sdpa_backends": ["cudnn_attention", "flash_attention"]},
                                      {"channels_last": True, "compile": True},
                                      {"channels_last": True, "compile": True,
                                       "sdpa_backends": ["cudnn_attention", "flash_attention"]}],
                         ids=["flash", "efficient", "cudnn-first", "cl+compile", "cl+compile+cudnn-first"])
def test_speed_switches_on_cuda_keep_the_bf16_outputs_and_gradients(switches, fresh_dynamo):
    results = []
    for params in ({"sdpa_backends": ["math"]}, switches):
        backbone = tiny_unet(**params).train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = backbone(*unet_inputs())
        out.float().square().mean().backward()
        results.append((out.float().detach(), backbone.unet.conv_in.weight.grad.clone()))
    (out0, grad0), (out1, grad1) = results
    torch.testing.assert_close(out1, out0, rtol=3e-2, atol=3e-2)  # bf16: ~3 significant digits
    torch.testing.assert_close(grad1, grad0, rtol=5e-2, atol=5e-3)


def sdpa_ops_of(backbone, inputs) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
            torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        backbone(*inputs)
    return {event.name for event in prof.events() if event.name.startswith("aten::_scaled_dot_product")}


def test_sdpa_backends_order_reaches_cudnn_attention_on_cuda():
    """``sdpa_backends`` is an order of preference on the GPU machine's torch: cuDNN first runs cuDNN,
    flash first runs flash (heads 40 wide, as SD-1.5's at 64 x 64 latents)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 64, 40, device=CUDA, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as err:
        pytest.skip(f"cuDNN attention refuses 40-wide heads here: {str(err).splitlines()[0]}")
    inputs = unet_inputs()
    cudnn_first = sdpa_ops_of(tiny_unet(block_out_channels=[32, 320],
                                        sdpa_backends=["cudnn_attention", "flash_attention"]).eval(), inputs)
    flash_first = sdpa_ops_of(tiny_unet(block_out_channels=[32, 320],
                                        sdpa_backends=["flash_attention", "cudnn_attention"]).eval(), inputs)
    assert "aten::_scaled_dot_product_cudnn_attention" in cudnn_first, cudnn_first
    assert "aten::_scaled_dot_product_flash_attention" in flash_first, flash_first
    assert "aten::_scaled_dot_product_cudnn_attention" not in flash_first


@pytest.mark.parametrize("attention", ["weights", "sdpa"])
def test_gated_harmonizer_attention_in_bf16_on_cuda_follows_fp32(attention):
    """The decoupled processor under bf16 autocast (``weights``: its own matmuls and fp32 softmax,
    scores rounded to bf16 as diffusers' non-SDPA processors do; ``sdpa``: two flash / efficient
    attention kernels and a lerp) stays within bf16 error of the fp32 layer."""
    from diffusers.models.attention_processor import Attention

    from id2face.components.harmonizer import DecoupledCrossAttnProcessor, TimestepGate

    torch.manual_seed(0)
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40).to(CUDA)
    gate = TimestepGate(320, 64, 64).to(CUDA)
    torch.nn.init.normal_(gate.mlp[-1].weight, std=0.5)
    processor = DecoupledCrossAttnProcessor(4, gate=gate, attention=attention)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 1024, 320, generator=g).to(CUDA)
    context, temb = torch.randn(4, 20, 768, generator=g).to(CUDA), torch.randn(4, 64, generator=g).to(CUDA)
    results = []
    for bf16 in (False, True):
        x = hidden.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = processor(attn, x, context, harmonizer_temb=temb)
        out.float().square().mean().backward()
        results.append((out.float().detach(), x.grad))
    (out32, grad32), (out16, grad16) = results
    torch.testing.assert_close(out16, out32, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grad16, grad32, rtol=5e-2, atol=5e-3)


def test_sd_vae_switches_on_cuda_keep_the_bf16_latents_and_images(fresh_dynamo):
    from id2face.registry import FIRST_STAGES

    config = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8)
    images = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(CUDA)
    results = []
    for switches in ({}, {"channels_last": True, "compile": True}):
        torch.manual_seed(3)
        stage = FIRST_STAGES.build({"name": "sd_vae", "params": {"random_init": True, "config": config,
                                                                 **switches}}).to(CUDA)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            latents = stage.encode(images)
            results.append((latents.float(), stage.decode(latents).float()))
    for switched, plain in zip(results[1], results[0]):  # bf16 through a whole VAE: a few elements
        difference = (switched - plain).abs()            # differ by a rounding step or more
        assert difference.mean() < 1e-2 and difference.max() < 0.15, (difference.mean(), difference.max())


def pipeline_runs(device, key=None):
    """(in turn, threaded): ``Anonymizer.process`` results of five one-face photos on ``device``,
    audited by the encoder recognizer: every stage in the caller's thread, then detection and
    paste-back + audit in worker threads three photos deep (each on its own CUDA stream)."""
    import numpy as np

    from id2face.anonymize import AnonymizeSettings, Anonymizer, build_audit_recognizer, training_template

    cfg = load_config(["tiny"])
    model = tiny_model().eval().to(device)
    audit = build_audit_recognizer("encoder", cfg).to(device)
    template, _ = training_template(cfg, 32)
    photos, detections = [], {}
    for identity in range(5):
        item = render_sample(identity % 3, identity, 96)  # persons 0-2, two of them twice (keyed clusters)
        photo = np.rint((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        points = item["landmarks"].numpy().astype(np.float64) - 0.5
        box = [points[:, 0].min() - 20, points[:, 1].min() - 25, points[:, 0].max() + 20, points[:, 1].max() + 30]
        photos.append(photo)
        detections[photo.tobytes()] = (np.array([box]), np.array([0.99]), points[None])

    def detector(pixels):
        return detections[np.ascontiguousarray(pixels).tobytes()]

    runs = []
    for depth in (0, 3):
        settings = AnonymizeSettings(steps=3, seed=0, batch_size=2, key=key)
        engine = Anonymizer(model, 32, template, settings, detector=detector, audit=audit, device=device,
                            pipeline_depth=depth)
        runs.append(list(engine.process(enumerate(photos))))
    return runs


@pytest.mark.parametrize("key", [None, "secret"])
def test_pipeline_stages_on_their_own_cuda_streams_give_the_in_turn_faces(key):
    import numpy as np

    in_turn, threaded = pipeline_runs(CUDA, key)
    assert [tag for tag, _ in threaded] == list(range(5))
    for (_, a), (_, b) in zip(in_turn, threaded):
        assert a.status == b.status and a.faces == b.faces and len(a.faces) == 1
        assert a.faces[0]["residual_similarity"] is not None
        assert (a.pixels is None) == (b.pixels is None)
        if a.pixels is not None:
            assert np.array_equal(a.pixels, b.pixels)


def test_stage_streams_outrank_the_sampling_stream():
    from id2face.anonymize.workers import StageWorker

    least, greatest = torch.cuda.Stream.priority_range()
    with StageWorker(True, CUDA, "detect", threads=2) as worker:
        streams = [worker.submit(torch.cuda.current_stream, CUDA).result() for _ in range(4)]
    sampling = torch.cuda.default_stream(CUDA)
    assert all(stream != sampling for stream in streams)
    if greatest < least:  # the device has priorities
        assert all(stream.priority < sampling.priority for stream in streams)


def test_bf16_unet_on_cuda_samples_as_close_to_fp32_as_bf16_autocast():
    batch = pair_batch(num_pairs=3)["a"]
    images, masks = batch["image"].to(CUDA), batch["mask"].to(CUDA)

    def anonymize(model):
        return model.anonymize(images, masks, generator=torch.Generator(CUDA).manual_seed(0), num_inference_steps=5)

    reference = tiny_model().eval().to(CUDA)
    low = tiny_model("model.backbone.params.dtype=bfloat16").eval().to(CUDA)
    with torch.no_grad():
        expected, result = anonymize(reference), anonymize(low)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = anonymize(reference).float()
    assert result.dtype == torch.float32 and torch.isfinite(result).all()
    assert (result - expected).abs().mean() < 1.5 * (mixed - expected).abs().mean()


def test_low_precision_norms_on_cuda_train_as_close_to_fp32_as_autocast():
    """CUDA's autocast runs the norms in fp32; the switch runs them in bf16: outputs and gradients
    of a training step land as close to fp32 as autocast's."""
    sample, timesteps, context = unet_inputs()

    def run(unet, mixed):
        unet.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed):
            out = unet(sample, timesteps, context).float()
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in unet.parameters()])

    stock = tiny_unet()
    reference, autocast = run(stock, False), run(stock, True)
    ours = run(tiny_unet(low_precision_norms=True), True)
    for mine, theirs, exact in zip(ours, autocast, reference):
        assert not torch.equal(mine, theirs)
        assert (mine - exact).abs().mean() < 1.5 * (theirs - exact).abs().mean()
