"""The benchmark scripts run (tiny, CPU) and their figures hang together; no timing is asserted."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.filterwarnings("ignore")


def run_script(name, argv, capsys) -> tuple[dict, str]:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_train_step_with_cached_latents_and_breakdown(capsys):
    figures, out = run_script("train_step", ["--profile", "tiny", "--device", "cpu", "--batch", "4", "--steps", "1",
                                             "--warmup", "1", "--cached-latents", "--breakdown"], capsys)
    assert figures["cached_latents"] and figures["ratio_full_over_bare"] > 0
    assert 1.0 < figures["flop_ratio_full_over_bare"] < 1.05
    full, bare = figures["breakdown_s"]["full"], figures["breakdown_s"]["bare"]
    assert "first_stage" not in full  # cached: the step encoded nothing
    components = ("identity_encoder", "id_vae", "attribute_encoder", "alignment", "identity_tokens", "backbone")
    assert all(full[c] > 0 for c in components)
    assert sum(full[c] for c in components) <= full["forward"]  # spans inside the forward span
    assert full["cross-attention layers"] < full["backbone"] and 0 < bare["cross-attention layers"] < bare["forward"]
    assert "cross-attention layers" in out


def test_sd15_flop_counts_with_and_without_the_latent_cache(capsys):
    """Meta device: the SD-1.5-size step's FLOPs without building anything real."""
    encoded, _ = run_script("train_step", ["--profile", "sd15", "--flops-only"], capsys)
    cached, _ = run_script("train_step", ["--profile", "sd15", "--flops-only", "--cached-latents"], capsys)
    assert encoded["flop_ratio_full_over_bare"] > 1.9  # two 512 px VAE encodes per image
    assert 1.0 < cached["flop_ratio_full_over_bare"] < 1.02
    assert "Encoder" in encoded["full_flops_per_image_by_role"]
    assert "Encoder" not in cached["full_flops_per_image_by_role"]


def test_sample_breakdown_adds_up_to_the_call(capsys):
    figures, _ = run_script("sample", ["--profile", "tiny", "--device", "cpu", "--steps", "2", "--batch", "2",
                                       "--samplers", "ddim", "--repeats", "1", "--breakdown"], capsys)
    parts = figures["breakdown_s"]
    assert figures["faces_per_s"] > 0 and set(parts) >= {"call", "UNet", "identity_encoder", "first_stage decode"}
    assert sum(v for k, v in parts.items() if k != "call") <= parts["call"]
    assert parts["UNet"] > parts["attribute_encoder"]


def test_harmonizer_attention_keeps_little_more_for_backward_than_stock_attention(capsys):
    figures, out = run_script("harmonizer_attention", ["--batch", "2", "--levels", "2", "3", "--repeats", "1"], capsys)
    rows = {(r["level"], r["processor"]): r for r in figures["rows"]}
    assert set(rows) == {(level, name) for level in ("1280 x 256", "1280 x 64") for name in ("stock", "sum", "gated")}
    assert all(r["ms"] > 0 for r in rows.values())
    # The gate folded into the attention weights: no second attention output or full-width blend
    # is kept (two SDPA calls + a blend kept 1.29x stock here).
    assert 1.0 < rows["1280 x 256", "gated"]["saved_over_stock"] < 1.15
    assert rows["1280 x 256", "sum"]["saved_bytes"] < rows["1280 x 256", "gated"]["saved_bytes"]


def test_sd15_sampling_flops_per_face_by_part(capsys):
    figures, out = run_script("sample", ["--profile", "sd15", "--flops-only", "--steps", "25"], capsys)
    parts, total = figures["flops_per_face_by_part"], figures["flops_per_face"]
    assert sum(parts.values()) == pytest.approx(total)
    unet = parts["UNet x 25 steps"]
    assert 0.78e12 < unet / 25 < 0.82e12  # SD-1.5 UNet at 64x64 latents, 20 context tokens
    vae = parts["first stage encode (masked image)"] + parts["first stage decode"]
    assert 0.10 < vae / total < 0.20 and parts["first stage decode"] > 2 * unet / 25
    assert figures["tflop_per_s_for_20_faces_per_s"] == pytest.approx(20 * total / 1e12)
    assert "faces/s needs" in out
