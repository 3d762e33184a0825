"""The benchmark scripts run (tiny, CPU) and their figures hang together; no timing is asserted."""
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.filterwarnings("ignore")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, argv, capsys) -> tuple[dict, str]:
    """(figures of the JSON last line, stdout + stderr: the table and the progress lines)."""
    module = load_script(name)
    assert module.main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.out + captured.err


def test_train_step_with_cached_latents_and_breakdown(capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after: the flag sets it process-wide
    figures, out = run_script("train_step", ["--profile", "tiny", "--device", "cpu", "--batch", "4", "--steps", "1",
                                             "--warmup", "1", "--cached-latents", "--breakdown", "--back-to-back", "1",
                                             "--kernel-table", "1000", "--cudnn-benchmark"], capsys)
    assert figures["cudnn_benchmark"] is True and torch.backends.cudnn.benchmark and "cudnn_benchmark=True" in out
    assert figures["cached_latents"] and figures["ratio_full_over_bare"] > 0
    assert figures["ratio_full_over_bare_back_to_back"] == pytest.approx(
        figures["full"]["back_to_back_step_s"] / figures["bare"]["back_to_back_step_s"])
    assert 1.0 < figures["flop_ratio_full_over_bare"] < 1.05
    assert 0 < figures["ema_update_s"] < figures["full"]["step_s"] and "EMA update after a step" in out
    full, bare = figures["breakdown_s"]["full"], figures["breakdown_s"]["bare"]
    assert "first_stage" not in full and "identity_encoder" not in full  # cached: nothing encoded or embedded
    components = ("id_vae", "attribute_encoder", "alignment", "identity_tokens", "backbone")
    assert all(full[c] > 0 for c in components)
    assert sum(full[c] for c in components) <= full["forward"]  # spans inside the forward span
    assert full["cross-attention layers"] < full["backbone"] and 0 < bare["cross-attention layers"] < bare["forward"]
    assert "cross-attention layers" in out
    assert "] FLOPs counted" in out and out.count("] warm-up step 1 of") == 2
    # Every op (fewer than 1000): which differ most by time is noise on one profiled CPU step; the calls are not.
    table = figures["kernel_table"]
    assert 20 < len(table["top"]) < 1000 and all(row["kernel"].startswith("aten::") for row in table["top"])
    for row in table["top"]:
        assert all(0 <= t <= total for t, total in zip(row["s"], (table["total_s"]["full"], table["total_s"]["bare"])))
    differences = [abs(row["s"][0] - row["s"][1]) for row in table["top"]]
    assert differences == sorted(differences, reverse=True)
    calls = {row["kernel"]: row["calls"] for row in table["top"]}
    softmax_full, softmax_bare = calls["aten::_softmax"]
    assert softmax_full > 0 and softmax_bare == 0  # the harmonizer's; stock attention's is inside its SDPA kernel


def test_kernel_table_keeps_the_kernels_whose_time_differs_most():
    kernels = {"full": {"mm": (2, 0.003), "softmax": (1, 0.001), "conv": (1, 0.002)},
               "bare": {"mm": (2, 0.001), "conv": (1, 0.0026), "sdpa": (1, 0.0005)}}
    table = load_script("train_step").print_kernel_table(kernels, 3, torch.device("cpu"))
    assert table["total_s"] == pytest.approx({"full": 0.006, "bare": 0.0041})
    assert [(row["kernel"], row["calls"], row["s"]) for row in table["top"]] == [
        ("mm", [2, 2], [0.003, 0.001]), ("softmax", [1, 0], [0.001, 0.0]), ("conv", [1, 1], [0.002, 0.0026])]


def test_anonymize_throughput_with_and_without_io_threads(capsys):
    """The whole file pipeline on JPEG photos, once per I/O and detection-ahead setting: same faces,
    all anonymized; --steady runs the photos twice over and rates the second half alone."""
    figures, out = run_script("anonymize_throughput", ["--photos", "2", "--faces-per-photo", "2", "--batch-sizes", "4",
                                                       "--steps", "2", "--io-workers", "0", "2", "--pipeline-depth",
                                                       "0", "2", "--detect-workers", "2", "--photo-format", "jpg",
                                                       "--photo-size", "800", "600", "--steady",
                                                       "--attention-backends", "flash_attention", "math",
                                                       "--cudnn-benchmark"], capsys)
    rows = figures["rows"]
    assert [(row["io_workers"], row["pipeline_depth"], row["detect_workers"]) for row in rows] == [
        (0, 0, 1), (0, 2, 2), (2, 0, 1), (2, 2, 2)]  # in turn (depth 0): no detect threads
    assert all(row["faces"] == row["anonymized"] == 4 and row["photos"] == 2 for row in rows)
    assert all(row["faces_twice"] == 8 and row["photos_twice"] == 4 for row in rows)
    for row in rows:  # each stage's busy time; in turn (depth 0) within the run's
        assert set(row["stage_seconds"]) == {"detect", "encode", "sample", "finish"}
        assert min(row["stage_seconds"].values()) > 0
        assert row["pipeline_depth"] or sum(row["stage_seconds"].values()) <= row["seconds"] + 0.01
    # 4 more faces in the extra seconds (each figure rounded to 0.01 s); none where timing noise made
    # the longer run no slower (a row of a loaded machine), but not in every row
    rated = [row for row in rows if row["steady_faces_per_s"] is not None]
    assert len(rated) >= 2 and all(row["seconds_twice"] - row["seconds"] <= 0.01 for row in rows if row not in rated)
    for row in rated:
        extra = row["seconds_twice"] - row["seconds"]
        assert 4 / (extra + 0.011) <= row["steady_faces_per_s"] <= (4 / (extra - 0.011) if extra > 0.011 else 1e9)
    assert figures["steady_faces_per_s"] == max(row["steady_faces_per_s"] for row in rated)
    # progress as it goes, so a run a time cap cuts off still says where its time went
    assert out.count("] warm-up run done") == 4 and out.count("] timed run twice over: 8 faces") == 4
    assert figures["photo_size"] == [800, 600] and figures["io_seconds_one_thread"] > 0
    assert figures["attention_backends"] == ["flash_attention", "math"] and figures["cudnn_benchmark"]
    assert {row["detect_device"] for row in rows} == {"cpu"} == {figures["best_detect_device"]}  # --device's
    assert figures["faces_per_s"] == max(row["faces_per_s"] for row in rows)
    assert "file decode + encode alone" in out
    from id2face.anonymize import DETECT_MAX_SIDE

    assert load_script("anonymize_throughput").parse_args([]).detect_max_side == DETECT_MAX_SIDE  # the command's


def test_anonymize_throughput_measures_an_ablation_of_the_profile_model(capsys):
    ablation = BENCHMARKS.parent / "ablations" / "guidance_negative.yaml"
    argv = ["--photos", "1", "--faces-per-photo", "2", "--batch-sizes", "2", "--steps", "2", "--io-workers", "0"]
    figures, _ = run_script("anonymize_throughput", [*argv, "--override", str(ablation)], capsys)
    assert figures["guidance"] == "negative" and str(ablation) in figures["model"]
    assert [row["anonymized"] for row in figures["rows"]] == [2]
    with pytest.raises(SystemExit):
        load_script("anonymize_throughput").parse_args(["--checkpoint", "x.pt", "--override", str(ablation)])
    assert "a --checkpoint runs with its own config" in capsys.readouterr().err


def test_face_detection_compares_both_mtcnn_drivers_on_the_same_photos(capsys):
    """Same faces from facenet-pytorch's detect and ours; ours without its per-candidate host reads."""
    figures, out = run_script("face_detection", ["--photos", "2", "--sides", "512", "1024", "--photo-size", "1024",
                                                 "768", "--threads", "1"], capsys)
    for side in ("512", "1024"):
        by_side = figures["sides"][side]
        theirs, ours = by_side["facenet-pytorch"], by_side["id2face"]
        assert by_side["same_faces"] and by_side["max_difference_px"] < 1e-3
        assert theirs["faces"] == ours["faces"] == 8
        assert theirs["host_reads_per_photo"] > 5 * ours["host_reads_per_photo"] > 0
        assert ours["ops_per_photo"] < theirs["ops_per_photo"]
        assert by_side["speedup"] == pytest.approx(theirs["ms_per_photo"] / ours["ms_per_photo"])
    shrink = figures["sides"]["512"]["downscale"]  # 1024 px photos: the 1024 side is not downscaled
    assert shrink["max_level_difference"] <= 1 and shrink["same_faces"] and shrink["max_box_difference_px"] < 2
    assert shrink["pil_ms"] > 0 and shrink["id2face_ms"] > 0
    assert "host reads/photo" in out and "what MTCNN sees" in out


def test_data_loading_times_the_training_loader_for_each_pixel_transport(capsys):
    figures, out = run_script("data_loading", ["--image-size", "96", "--files", "64", "--batch", "4", "--batches", "3",
                                               "--workers", "0", "1", "--rounds", "1", "--repeats", "3",
                                               "--step-rates", "100", "1e6"], capsys)
    rows = {(row["workers"], row["transport"]): row for row in figures["loader"]}
    assert set(rows) == {(w, t) for w in (0, 1) for t in ("float32", "uint8")}
    assert min(row["img_per_s"] for row in rows.values()) > 0
    # 4 pairs of 96 px images and masks: 8 x (3 + 1) x 96 x 96 values, 4 bytes or 1 each.
    assert rows[0, "float32"]["batch_mib"] == pytest.approx(8 * 4 * 96 * 96 * 4 / 2**20, abs=0.01)
    assert rows[1, "uint8"]["batch_mib"] == pytest.approx(8 * 4 * 96 * 96 / 2**20, abs=0.01)
    for transport, rate in figures["img_per_s_per_worker"].items():
        assert rate == pytest.approx(rows[1, transport]["img_per_s"], abs=0.1)
        assert figures["workers_needed"][transport] == {"100": math.ceil(100 / rate), "1e+06": math.ceil(1e6 / rate)}
    assert figures["file_kib"] > 5  # photo crops, not flat colour
    assert min(figures["part_ms"].values()) >= 0 and figures["part_ms"]["read + decode the file"] > 0
    assert "workers needed at" in out


def test_train_loop_times_lightnings_fit_against_the_step_it_is_made_of(capsys):
    figures, out = run_script("train_loop", ["--profile", "tiny", "--pairs", "2", "--steps", "2", "--warmup", "1",
                                             "--override", "model.optim.ema_every=2", "trainer.log_every_n_steps=1"],
                              capsys)
    assert figures["images_per_step"] == 4 and figures["precision"] == "32-true" and figures["workers"] == 0
    # the run's own log of its last step, beside the window's timing
    assert figures["logged_step"] == 3 and figures["logged_images_per_s"] > 0 and "logged_mfu" not in figures
    assert "fit, as its run logs it (throughput/*, steps 3-3)" in out
    assert figures["ema_every"] == 2 and figures["loop_ema_updates"] == 1  # fit ran 3 steps: one update, at 2
    assert figures["loop_step_s"] > 0 and figures["step_s"] > 0
    assert figures["ratio_loop_over_step"] == pytest.approx(figures["loop_step_s"] / figures["step_s"])
    assert "ratio loop / step" in out and "] fit: 1 + 2 steps" in out


def test_face_alignment_times_each_part_and_checks_the_crop_against_the_whole_photo_warp(capsys):
    figures, out = run_script("face_alignment", ["--size", "128", "--photo-size", "1600", "1200", "--repeats", "1"],
                              capsys)
    assert set(figures["ms_per_face"]) == {"crop (whole-photo warp, before)", "crop (crop_face)", "identity mask",
                                           "mask grown", "feathered (paste-back thread)"}
    assert min(figures["ms_per_face"].values()) > 0
    assert figures["crop_max_difference"] <= 1 and figures["crop_differing_fraction"] < 1e-3
    assert figures["crop_speedup"] == pytest.approx(figures["ms_per_face"]["crop (whole-photo warp, before)"]
                                                    / figures["ms_per_face"]["crop (crop_face)"])
    assert "crop_face" in out


def test_attention_backends_times_each_sdpa_backend_against_the_math_one(capsys):
    figures, out = run_script("attention_backends", ["--device", "cpu", "--levels", "2", "3", "--batch", "2",
                                                     "--repeats", "1"], capsys)
    for level, (width, tokens) in {"2": (1280, 256), "3": (1280, 64)}.items():
        entry = figures["levels"][level]
        assert (entry["width"], entry["tokens"], entry["head_dim"]) == (width, tokens, 160)
        assert entry["flops"] == 12 * 2 * 8 * tokens ** 2 * 160
        backends = entry["backends"]
        assert backends["math"]["max_difference"] == 0.0
        for name in ("default", "flash_attention"):  # on a CPU: fp32, the same attention
            assert backends[name]["available"] and backends[name]["ms"] > 0 and backends[name]["max_difference"] < 1e-4
        assert not backends["cudnn_attention"]["available"] and backends["cudnn_attention"]["reason"]
    unet = figures["unet_self_attention_ms"]
    assert "cudnn_attention" not in unet  # not measured at every level
    levels = figures["levels"]
    assert unet["flash_attention"] == pytest.approx(5 * levels["2"]["backends"]["flash_attention"]["ms"]
                                                    + levels["3"]["backends"]["flash_attention"]["ms"])
    assert "self-attention layers (5 + 1), flash_attention" in out
    # both ran everywhere: the faster one alone sets the time, the other is its fallback
    faster = min(("math", "flash_attention"), key=unet.get)
    assert figures["fastest_first"][0] == faster and sorted(figures["fastest_first"]) == ["flash_attention", "math"]
    assert figures["fastest_first_ms"] == pytest.approx(unet[faster]) and not figures["forward_only"]
    assert f"sdpa_backends=[{','.join(figures['fastest_first'])}]" in out


def test_attention_backends_forward_only_times_sampling_s_attention(capsys):
    figures, out = run_script("attention_backends", ["--device", "cpu", "--levels", "3", "--batch", "2",
                                                     "--repeats", "1", "--forward-only"], capsys)
    entry = figures["levels"]["3"]
    assert figures["forward_only"] and entry["flops"] == 4 * 2 * 8 * 64 ** 2 * 160  # no backward's 8 B H N^2 d
    assert entry["backends"]["math"]["max_difference"] == 0.0 and entry["backends"]["flash_attention"]["ms"] > 0
    assert "forward (sampling)" in out


def test_the_fastest_attention_order_counts_each_level_on_the_first_backend_that_takes_it():
    """cuDNN fastest where most of the time goes but refusing a level: first in the order, with
    that level falling back to the next (as ``sdpa_backends`` runs it)."""
    module = load_script("attention_backends")

    def ran(ms):
        return {"available": True, "ms": ms}

    refused = {"available": False, "reason": "no"}
    levels = {0: {"backends": {"default": ran(10.0), "flash_attention": ran(10.0), "cudnn_attention": ran(6.0),
                               "efficient_attention": ran(8.0)}},
              3: {"backends": {"default": ran(1.0), "flash_attention": ran(1.0), "cudnn_attention": refused,
                               "efficient_attention": ran(0.5)}}}
    # level 0 has 5 layers, level 3 one: cuDNN then efficient, 5 x 6 + 0.5 (efficient first: 5 x 8 + 0.5)
    assert module.fastest_order(levels, [0, 3]) == (["cudnn_attention", "efficient_attention", "flash_attention"],
                                                    pytest.approx(30.5))
    assert module.fastest_order({0: {"backends": {"default": ran(1.0), "math": refused}}}, [0]) == ([], None)


COMPILED_ANONYMIZE = ["anonymize_throughput.py", "--photos", "1", "--faces-per-photo", "2", "--steps", "2",
                      "--io-workers", "0", "--compile", "--precision", "bf16-mixed"]


@pytest.mark.slow
def test_dynamo_check_passes_the_compiled_pipeline_and_counts_what_would_split_it(monkeypatch, capsys):
    """The compiled file pipeline (tiny) traces as whole graphs, once; the check counts the graph
    breaks of an autocast query dynamo cannot trace (torch 2.11's) and the recompilation of a
    second batch size, and exits 1 for them."""
    check = load_script("dynamo_check")
    assert check.main(["no_such_benchmark.py"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    def figures_of(argv, status):
        assert check.main(argv) == status
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    clean = figures_of([*COMPILED_ANONYMIZE, "--batch-sizes", "2"], 0)
    assert clean["graphs"] >= 1 and clean["graph_breaks"] == clean["recompilations"] == 0
    resized = figures_of([*COMPILED_ANONYMIZE, "--batch-sizes", "2", "4"], 1)
    assert resized["graph_breaks"] == 0 and resized["recompilations"] >= 1
    import id2face.precision as precision

    monkeypatch.setattr(precision, "_autocast_available", torch._dynamo.disable(precision._autocast_available))
    split = figures_of([*COMPILED_ANONYMIZE, "--batch-sizes", "2"], 1)
    assert split["graph_breaks"] >= 2 and split["graphs"] > clean["graphs"]  # a break in each cross-attention layer


def test_train_step_eager_bare_compiles_our_unet_alone(capsys):
    """The MFU run's half compilation: one graph (ours), where compiling both makes two."""
    check = load_script("dynamo_check")
    argv = ["train_step.py", "--profile", "tiny", "--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "1",
            "--cached-latents", "--compile", "--eager-bare"]
    assert check.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    traced = json.loads(out[-1])
    assert traced["graphs"] == 1 and traced["graph_breaks"] == traced["recompilations"] == 0
    step = next(json.loads(line) for line in reversed(out[:-1]) if '"benchmark": "train_step"' in line)
    assert step["compile"] and not step["bare_compiled"] and "ours only" in "\n".join(out)
    with pytest.raises(SystemExit):
        load_script("train_step").parse_args(["--eager-bare"])
    assert "give --compile too" in capsys.readouterr().err


def test_switch_quality_evaluates_each_arithmetic_beside_a_seed_change(tmp_path, capsys):
    """The shipped demo model under fp32, another seed and bf16 autocast: one eval run each, and
    the shifts are the differences to fp32 (an untrained encoder judges: no oracle to train here).
    Four faces, four DDIM steps: bf16 matmuls are emulated on CPUs without AVX512-BF16 (~10x fp32)."""
    checkpoint = BENCHMARKS.parent / "checkpoints" / "demo-tiny.pt"
    figures, out = run_script("switch_quality", ["--checkpoint", str(checkpoint), "--device", "cpu", "--limit", "4",
                                                 "--variants", "fp32", "seed", "bf16", "--out", str(tmp_path),
                                                 "--override", "eval.recognizers=[{name: encoder, params: {encoder: "
                                                 "tiny}}]", "model.sampler.params.num_inference_steps=4"], capsys)
    metrics = figures["metrics"]
    assert list(metrics) == ["fp32", "seed", "bf16"]
    assert all((tmp_path / name / "metrics.json").is_file() for name in metrics)
    for key in ("psnr", "ssim", "pose"):
        assert figures["max_shift"][key] == pytest.approx(abs(metrics["bf16"][key] - metrics["fp32"][key]))
        assert figures["seed_shift"][key] == pytest.approx(abs(metrics["seed"][key] - metrics["fp32"][key]))
    assert figures["seed_shift"]["psnr"] > 0  # other noise, other reconstructions
    assert figures["max_shift"]["psnr"] < 0.1 < metrics["fp32"]["psnr"]  # bf16 rounding only
    assert "| max shift |" in out and "| seed shift |" in out


def test_switch_quality_needs_the_fp32_reference():
    with pytest.raises(SystemExit):
        load_script("switch_quality").parse_args(["--checkpoint", "x.pt", "--variants", "bf16"])


@pytest.mark.slow
def test_sd15_flop_counts_with_and_without_the_latent_cache(capsys):
    """Meta device: the SD-1.5-size step's FLOPs without building anything real."""
    encoded, _ = run_script("train_step", ["--profile", "sd15", "--flops-only"], capsys)
    cached, _ = run_script("train_step", ["--profile", "sd15", "--flops-only", "--cached-latents"], capsys)
    assert encoded["flop_ratio_full_over_bare"] > 1.9  # two 512 px VAE encodes per image
    assert 1.0 < cached["flop_ratio_full_over_bare"] < 1.02
    assert "Encoder" in encoded["full_flops_per_image_by_role"]
    assert "Encoder" not in cached["full_flops_per_image_by_role"]


@pytest.mark.parametrize("count", ["--flops-only", "--traffic"])
def test_step_counts_take_an_ablation_whose_attribute_encoder_has_no_token_param(count, capsys):
    """`attributes_none` (one zero token, no `num_tokens` in its params): the bare step's context
    gets the built model's token count, not a config key the variant lacks."""
    figures, _ = run_script("train_step", ["--profile", "tiny", count, "--cached-latents",
                                           "--override", "model.attribute_encoder.name=none"], capsys)
    ratio = figures.get("flop_ratio_full_over_bare") or figures["full"]["flops"] / figures["bare"]["flops"]
    assert 1.0 <= ratio < 1.05
    common = load_script("_common")
    model, _ = common.build_model("tiny", torch.device("cpu"), ["model.attribute_encoder.name=none"])
    assert common.context_tokens(model) == model.identity_tokens.num_tokens + 1


ABLATIONS = sorted((BENCHMARKS.parent / "ablations").glob("*.yaml"))
_DEFAULT_SAMPLING_COUNTS: dict = {}


def default_sampling_counts(capsys) -> dict:
    """The default config's tiny sampling count, which every ablation is compared with: made once."""
    if not _DEFAULT_SAMPLING_COUNTS:
        figures, _ = run_script("sample", ["--profile", "tiny", "--flops-only", "--steps", "4"], capsys)
        _DEFAULT_SAMPLING_COUNTS.update(figures)
    return _DEFAULT_SAMPLING_COUNTS


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda path: path.stem)
def test_every_ablation_file_runs_through_the_flop_counts(ablation, capsys):
    """A benchmark's --override takes config files as the CLI does; every ablation must build and
    count on the meta device (the DPM-Solver and no-attribute-token ablations once did not)."""
    step, _ = run_script("train_step", ["--profile", "tiny", "--flops-only", "--override", str(ablation)], capsys)
    assert 1.0 <= step["flop_ratio_full_over_bare"] < 1.1
    sampling, _ = run_script("sample", ["--profile", "tiny", "--flops-only", "--steps", "4",
                                          "--override", str(ablation)], capsys)
    reference = default_sampling_counts(capsys)
    unet = {name: figures["flops_per_face_by_part"]["UNet x 4 steps"] for name, figures in
            (("ablation", sampling), ("default", reference))}
    # Guidance that needs a second condition runs the UNet on twice the batch.
    copies = 2 if ablation.stem in ("guidance_cfg", "guidance_negative") else 1
    assert sampling["unet_copies"] == copies
    assert unet["ablation"] / unet["default"] == pytest.approx(copies, rel=0.05)


def test_sample_grid_adds_the_configured_guidance_beside_none_and_cfg(capsys):
    figures, _ = run_script("sample", ["--profile", "tiny", "--steps", "2", "--batch", "2", "--repeats", "1",
                                       "--samplers", "ddim", "--cfg", "--override",
                                       str(BENCHMARKS.parent / "ablations" / "guidance_negative.yaml")], capsys)
    assert {(row["guidance"], row["unet_batch"]) for row in figures["grid"]} == {("none", 2), ("negative", 4),
                                                                               ("cfg", 4)}


EXPERIMENTS = sorted(path for path in (BENCHMARKS.parent / "experiments").rglob("*.yaml")
                     if not path.name.endswith(".sweep.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda path: path.stem)
def test_the_sd15_profile_builds_every_experiment_file_with_random_weights(experiment):
    """Experiment files name weight files a benchmark machine lacks, and may swap in an encoder
    without the profile's random-init switch: the profile still builds (on the meta device)."""
    common = load_script("_common")
    with torch.device("meta"):
        model, cfg = common.build_model("sd15", torch.device("meta"), [str(experiment)])
    assert cfg.model.identity_encoder.params.weights is None and cfg.model.backbone.params.pretrained is None
    assert model.first_stage.latent_channels == 4 and model.backbone.unet.config.in_channels == 9


def test_ablation_costs_rates_each_ablation_against_the_default(capsys):
    ablations = [str(BENCHMARKS.parent / "ablations" / f"{name}.yaml") for name in ("guidance_cfg", "attributes_none")]
    figures, out = run_script("ablation_costs", ["--profile", "tiny", "--steps", "2", "--ablations", *ablations],
                              capsys)
    rows = figures["rows"]
    assert set(rows) == {"default", "guidance_cfg", "attributes_none"}
    assert rows["default"]["train_flops_ratio"] == rows["default"]["sample_flops_ratio"] == 1.0
    assert rows["guidance_cfg"]["sample_flops_ratio"] == pytest.approx(2.0, rel=0.02)  # the UNet twice a step
    assert rows["guidance_cfg"]["trainable_params"] == rows["default"]["trainable_params"]
    assert rows["attributes_none"]["trainable_params"] < rows["default"]["trainable_params"]
    assert rows["attributes_none"]["train_flops_ratio"] < 1.0 and "attributes_none" in out
    with pytest.raises(SystemExit):
        load_script("ablation_costs").parse_args(["--ablations", "ablations/nope.yaml"])
    assert "no such ablation file: ablations/nope.yaml" in capsys.readouterr().err


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
    names = ("stock", "sum-weights", "sum-sdpa", "gated-weights", "gated-sdpa")
    assert set(rows) == {(level, name) for level in ("1280 x 256", "1280 x 64") for name in names}
    assert all(r["ms"] > 0 and r["kernels"] > 0 and r["bytes"] > 0 for r in rows.values())
    # The gate folded into the attention weights: no second attention output or full-width blend
    # is kept (two SDPA calls + a blend kept 1.29x stock here).
    level = "1280 x 256"
    assert 1.0 < rows[level, "gated-weights"]["saved_over_stock"] < 1.15
    assert rows[level, "sum-weights"]["saved_bytes"] < rows[level, "gated-weights"]["saved_bytes"]
    # ... at the price of more kernels than two fused attentions and a lerp; each more than stock.
    for harmonizer in ("sum", "gated"):
        assert rows[level, "stock"]["kernels"] < rows[level, f"{harmonizer}-sdpa"]["kernels"] \
            < rows[level, f"{harmonizer}-weights"]["kernels"]


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

    tiny, out = run_script("sample", ["--profile", "sd15", "--flops-only", "--steps", "25", "--decoders", "taesd"],
                           capsys)
    assert tiny["decoder"] == "taesd" and "decoder taesd" in out
    tiny_parts = tiny["flops_per_face_by_part"]
    assert {k: v for k, v in tiny_parts.items() if k != "first stage decode"} == \
        {k: v for k, v in parts.items() if k != "first stage decode"}  # the SD VAE still encodes
    assert 0.12e12 < tiny_parts["first stage decode"] < parts["first stage decode"] / 15  # TAESD at 512 px
    assert tiny["flops_per_face"] < 0.91 * total


def test_sample_refuses_a_tiny_decoder_for_pixel_space_models(capsys):
    with pytest.raises(SystemExit):
        run_script("sample", ["--profile", "tiny", "--decoders", "own", "taesd"], capsys)
    assert "--profile sd15" in capsys.readouterr().err


def load_traffic_module():
    spec = importlib.util.spec_from_file_location("bench_traffic", BENCHMARKS / "_traffic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


def test_traffic_counter_counts_a_layer_as_cuda_autocast_runs_it():
    torch = pytest.importorskip("torch")
    T = load_traffic_module()
    layer = torch.nn.Linear(64, 32, bias=False)
    norm = torch.nn.GroupNorm(4, 32)
    with T.fake_cpu():
        x = torch.randn(16, 64)

        outputs = []

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs.append(norm(layer(x)[:, :, None]))

        traffic = T.count_traffic(forward, peak_flops=1e12, bandwidth=1e9)
    assert outputs[0].dtype == torch.float32  # GroupNorm in fp32, as CUDA's autocast runs it
    mm = traffic.by_op["mm"]
    assert (mm.kernels, mm.flops) == (1, 2 * 16 * 64 * 32)
    assert mm.bytes == 2 * (16 * 64 + 64 * 32 + 16 * 32)  # bf16 input, weight and output
    assert mm.roofline_s == pytest.approx(mm.bytes / 1e9)  # memory-bound at these rates
    # input and weight cast to bf16, the product cast back to fp32 for the norm
    assert traffic.by_op["_to_copy"].kernels == 3
    assert traffic.by_op["native_group_norm"].kernels == 1
    assert "view" not in traffic.by_op and "unsqueeze" not in traffic.by_op  # views move nothing
    assert traffic.kernels == sum(c.kernels for c in traffic.by_op.values()) == 5


def test_traffic_counter_counts_the_fused_optimizer_which_returns_nothing():
    torch = pytest.importorskip("torch")
    T = load_traffic_module()
    with T.fake_cpu():
        params = [torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(10, 10))]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
        optimizer.step()  # allocates the moments
        traffic = T.count_traffic(optimizer.step, peak_flops=1e12, bandwidth=1e9)
    fused = traffic.by_op["_fused_adamw_"]
    # one kernel over parameters, gradients and both moments (fp32), and the step counters
    assert fused.kernels == 1
    assert fused.bytes == 4 * 4 * 1100 + 2 * 4


@pytest.mark.slow
def test_sd15_step_traffic_on_fake_tensors(capsys):
    """The whole SD-1.5-size step of both models, counted without memory or compute."""
    figures, out = run_script("train_step", ["--profile", "sd15", "--traffic", "--bf16", "--cached-latents"], capsys)
    full, bare = figures["full"], figures["bare"]
    assert 1.0 < full["flops"] / bare["flops"] < 1.02  # as --flops-only counts it
    assert 2.3e12 < bare["flops"] / 32 < 2.6e12  # 2.39 TFLOP/img (+ the optimizer's share)
    assert full["kernels"] > bare["kernels"] and full["bytes"] > bare["bytes"]
    # A lower bound: the bare step took 359 ms on an H100 (BENCHMARKS.md).
    assert 0.1 < bare["roofline_s"] < 0.359
    assert figures["roofline_ratio_full_over_bare"] == pytest.approx(full["roofline_s"] / bare["roofline_s"])
    assert "roofline ms" in out


def test_memory_tracker_peaks_with_what_a_step_holds_and_skips_frozen_parameters():
    T = load_traffic_module()
    with T.fake_cpu():
        frozen = torch.nn.Linear(512, 512, bias=False).requires_grad_(False)  # MemTracker alone raises on it
        head = torch.nn.Linear(512, 256, bias=False)
        model = torch.nn.Sequential(frozen, head)
        x = torch.randn(1024, 512)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
        head.weight.grad = torch.zeros_like(head.weight)
        optimizer.step()  # the moments exist before the tracked step
        peak = T.track_memory(lambda: model(x).square().mean() + model(x).mean(), optimizer, model)  # model twice
    head_bytes = 512 * 256 * 4
    assert peak["Parameter"] == 512 * 512 * 4 + head_bytes
    assert 2 * head_bytes <= peak["Optstate"] <= 2 * head_bytes + 512  # + the step counter, one allocator block
    hidden = 1024 * 512 * 4  # the frozen layer's output of each call, saved for the head's weight gradient
    assert peak["Total"] >= peak["Parameter"] + peak["Optstate"] + 2 * hidden
    assert peak["Gradient"] <= head_bytes  # no gradient for the frozen weight
    assert head.weight.grad is None


def test_train_step_memory_on_fake_tensors_scales_with_the_batch(capsys):
    small, _ = run_script("train_step", ["--profile", "tiny", "--memory", "--bf16", "--batch", "4"], capsys)
    large, out = run_script("train_step", ["--profile", "tiny", "--memory", "--bf16", "--batch", "16"], capsys)
    for figures in (small, large):
        for name in ("full", "bare"):
            step = figures[name]
            kinds = step["by_kind_at_peak_bytes"]
            assert kinds["Parameter"] >= 4 * step["params"] > kinds["Parameter"] - 512 * 1000
            assert 8 * step["trainable_params"] <= kinds["Optstate"] < 8 * step["trainable_params"] + 512 * 1000
            assert step["step_peak_bytes"] == kinds["Total"] - kinds["Parameter"] - kinds["Buffer"] - kinds["Optstate"]
        assert figures["ema_bytes"] == figures["ddp_bucket_bytes"] == 4 * figures["full"]["trainable_params"]
        assert figures["training_process_bytes"] == figures["full"]["peak_bytes"] + 2 * figures["ema_bytes"]
        assert figures["training_process_bytes_gradient_views"] == figures["full"]["peak_bytes"] + figures["ema_bytes"]
    for name in ("full", "bare"):  # activations grow with the images; parameters and state do not
        assert 3.0 < large[name]["step_peak_bytes"] / small[name]["step_peak_bytes"] < 4.2
    assert large["full"]["step_peak_bytes"] > large["bare"]["step_peak_bytes"]  # + conditioning, harmonizer
    assert "per-GPU total" in out

    # Gradient checkpointing keeps the UNet's block inputs only; its recompute in backward runs the
    # norms in fp32 as forward did (CUDA's autocast policy, emulated there too).
    checkpointed, _ = run_script("train_step", ["--profile", "tiny", "--memory", "--bf16", "--batch", "16",
                                                "--override", "model.backbone.params.gradient_checkpointing=true"],
                                 capsys)
    assert checkpointed["full"]["step_peak_bytes"] < 0.5 * large["full"]["step_peak_bytes"]
    assert checkpointed["bare"] == large["bare"]  # the stock UNet's step is the stock one


@pytest.mark.slow
def test_sd15_step_memory_on_fake_tensors_matches_the_h100(capsys):
    """The SD-1.5-size step with cached latents at 32 images peaked 42371 MiB (ours) and 39988 MiB
    (the bare UNet) above the pre-step level on an H100 (2026-11-27, BENCHMARKS.md)."""
    figures, _ = run_script("train_step", ["--profile", "sd15", "--memory", "--bf16", "--cached-latents"], capsys)
    assert figures["full"]["step_peak_bytes"] / 2**20 == pytest.approx(42371, rel=0.05)
    assert figures["bare"]["step_peak_bytes"] / 2**20 == pytest.approx(39988, rel=0.05)


@pytest.mark.slow
def test_sd15_sampling_traffic_and_the_bf16_vae(capsys):
    """The eager bound of one SD-1.5 anonymization by part, and what the bf16 VAE saves of it."""
    argv = ["--profile", "sd15", "--traffic", "--bf16", "--steps", "25", "--batch", "2"]
    default, out = run_script("sample", argv, capsys)
    bf16_vae, _ = run_script("sample", [*argv, "--override", "model.first_stage.params.dtype=bfloat16"], capsys)
    parts = default["parts"]
    assert sum(p["roofline_s"] for p in parts.values()) == pytest.approx(default["roofline_s"])
    assert default["faces_per_s_bound"] == pytest.approx(2 / default["roofline_s"])
    assert 0.75 < parts["UNet x 25 steps"]["roofline_s"] / default["roofline_s"] < 0.9
    for part in ("first stage decode", "first stage encode (masked image)"):
        assert bf16_vae["parts"][part]["flops"] == parts[part]["flops"]
        assert bf16_vae["parts"][part]["bytes"] < 0.6 * parts[part]["bytes"]  # no fp32 norms, no casts
    assert bf16_vae["faces_per_s_bound"] > default["faces_per_s_bound"]
    assert "eager bound" in out
    # the UNet's weights are cast to bf16 once per call (autocast's cache), not at every step
    unet = parts["UNet x 25 steps"]
    assert 25 * 1300 < unet["kernels"] < 25 * 1500  # ~1970 kernels at the first step, ~1410 after

    bf16_unet, _ = run_script("sample", [*argv, "--override", "model.backbone.params.dtype=bfloat16"], capsys)
    low = bf16_unet["parts"]["UNet x 25 steps"]
    assert low["flops"] == unet["flops"] and low["bytes"] < 0.75 * unet["bytes"]  # no fp32 norms, no casts
    assert bf16_unet["parts"]["first stage decode"] == parts["first stage decode"]


def load_host_module():
    sys.path.insert(0, str(BENCHMARKS))  # _host imports its siblings (_common, _traffic) by name
    try:
        spec = importlib.util.spec_from_file_location("bench_host", BENCHMARKS / "_host.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_host_marks_add_up_phases():
    H = load_host_module()
    ticks = iter([0.0, 1.0, 3.0, 3.5, 6.0])
    marks = H.Marks(lambda: next(ticks))
    marks("forward"), marks("backward"), marks("forward"), marks("optimizer"), marks(None)
    assert marks.spans == {"forward": 1.5, "backward": 2.0, "optimizer": 2.5}


@pytest.mark.slow
def test_the_narrow_copy_cuts_only_the_widths_an_ablations_variants_take():
    """`--host-overhead --override ablations/X.yaml`: the file is layered before the narrowing keys,
    which must skip the params its variant lacks (the null attribute encoder's width)."""
    H, common = load_host_module(), load_script("_common")
    for ablation in ABLATIONS:
        keys = H.narrow_overrides("sd15", [str(ablation)])
        with torch.device("meta"):
            model, _ = common.build_model("sd15", torch.device("meta"), keys)
        assert model.backbone.unet.config.block_out_channels == (16, 32, 64, 64), ablation.stem
    dropped = set(H.NARROW_OVERRIDES["sd15"]) - set(H.narrow_overrides("sd15", [str(ABLATIONS[0].parent /
                                                                                     "harmonizer_sum.yaml")]))
    assert dropped == {"model.harmonizer.params.gate_hidden=8", "model.harmonizer.params.time_embed_dim=16"}


def test_sd15_step_host_overhead_by_phase(capsys):
    """The host's side of the SD-1.5 step, on its narrow copy: every phase timed and counted."""
    figures, out = run_script("train_step", ["--profile", "sd15", "--host-overhead", "--reps", "1"], capsys)
    full, bare = figures["full"], figures["bare"]
    assert set(full["kernels_by_phase"]) == {"conditioning", "unet forward + loss", "backward", "optimizer"}
    assert set(bare["kernels_by_phase"]) == {"unet forward + loss", "backward", "optimizer"}
    assert figures["batches"] == [4, 8]
    for step in (full, bare):
        assert step["kernels"] == sum(step["kernels_by_phase"].values())
        assert step["issue_s"] == pytest.approx(sum(step["issue_s_by_phase"].values()))
        for phase, t4 in step["host_s_by_phase"]["4"].items():
            assert 0 < t4 and 0 <= step["issue_s_by_phase"][phase] <= 2 * t4
    assert full["kernels"] > bare["kernels"] and full["kernels_by_phase"]["conditioning"] > 50
    assert "before the UNet's first kernel" in out


@pytest.mark.slow
def test_the_narrow_sd15_copy_issues_the_full_width_steps_kernels(capsys):
    """The premise of --host-overhead: cutting widths changes no op (fp32, so the two autocast
    policies do not differ; ~30 s: the full-width step on fake tensors)."""
    narrow, _ = run_script("train_step", ["--profile", "sd15", "--host-overhead", "--reps", "1"], capsys)
    fake, _ = run_script("train_step", ["--profile", "sd15", "--traffic", "--cached-latents", "--batch", "4"], capsys)
    assert narrow["full"]["kernels"] == fake["full"]["kernels"]
    assert narrow["bare"]["kernels"] == fake["bare"]["kernels"]


def test_gpu_wheels_lists_what_this_environment_runs():
    """The wheels a GPU session carries are pinned to the versions the tests here ran with."""
    import subprocess
    from importlib.metadata import version

    out = subprocess.run(["bash", str(BENCHMARKS / "gpu_wheels.sh"), "--list"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHON": sys.executable}).stdout
    pins = dict(line.split("==") for line in out.split())
    assert {"diffusers", "omegaconf", "submitit", "facenet-pytorch"} <= set(pins)
    assert all(pins[name] == version(name) for name in pins)


GPU_SH_PARTS = re.findall(r"want (\w+)", (BENCHMARKS / "gpu.sh").read_text())


def gpu_sh_calls(tmp_path, parts, **env) -> list[list[str]]:
    """The commands ``gpu.sh parts`` runs, recorded by a stand-in python (script, then its argv);
    its attention parts "find" the order cuDNN, flash."""
    import subprocess

    tmp_path.mkdir(parents=True, exist_ok=True)
    calls_log, python = tmp_path / "calls.tsv", tmp_path / "python"
    order = '{"fastest_first": ["cudnn_attention", "flash_attention"]}'
    python.write_text(f'#!/bin/sh\ncase "$2" in *fastest_first*) exec {sys.executable} "$@";; esac\n'
                      f'[ "$1" = "-c" ] && exit 0\nprintf "%s\\t" "$@" >> {calls_log}\necho >> {calls_log}\n'
                      f'case "$1" in *attention_backends.py) echo \'{order}\';; esac\n')
    python.chmod(0o755)
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), *parts],
                          env={**os.environ, "PYTHON": str(python), **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line.rstrip("\t").split("\t") for line in calls_log.read_text().splitlines() if line]


def test_gpu_sh_gives_each_script_only_flags_it_accepts(tmp_path):
    """A flag typo in gpu.sh would cost a scarce GPU session: every part's commands, recorded by a
    stand-in python, parse with their scripts' own parsers."""
    parts = GPU_SH_PARTS
    assert {"cached", "cached_low_norms", "sample_bf16", "anonymize", "anonymize_fast", "anonymize_compiled",
            "detection", "attention"} <= set(parts)
    calls = gpu_sh_calls(tmp_path, parts)
    assert len(calls) >= len(parts) + 2  # `switches` runs three steps
    modules = {}
    for script, *argv in calls:
        name = Path(script).stem
        modules.setdefault(name, load_script(name)).parse_args(argv)  # SystemExit on an unknown flag or value
    assert set(modules) == {"train_step", "sample", "harmonizer_attention", "anonymize_throughput", "fid_features",
                            "face_detection", "face_alignment", "attention_backends", "train_loop"}
    # the attention parts run first, and every part after them runs the UNet's attention in the order found
    assert [Path(script).stem for script, *_ in calls[:2]] == ["attention_backends"] * 2
    preference = "model.backbone.params.sdpa_backends=[cudnn_attention,flash_attention]"
    for script, *argv in calls[2:]:
        name = Path(script).stem
        if name in ("train_step", "sample"):
            assert preference in load_script(name).parse_args(argv).override, argv
        elif name == "anonymize_throughput":
            assert load_script(name).parse_args(argv).attention_backends == ["cudnn_attention", "flash_attention"]


def test_gpu_sh_layers_the_users_config_on_every_model_part(tmp_path):
    """CONFIG="FILES KEY=VALUE": an ablation's figures on the GPU, in the same call as the parts."""
    ablation = str(BENCHMARKS.parent / "ablations" / "harmonizer_sum.yaml")
    calls = gpu_sh_calls(tmp_path, GPU_SH_PARTS, CONFIG=f"{ablation} model.loss.id_dropout=0.2")
    takes_a_model = {"train_step", "sample", "anonymize_throughput", "train_loop"}
    seen = set()
    for script, *argv in calls:
        name = Path(script).stem
        if name in takes_a_model:
            seen.add(name)
            assert {ablation, "model.loss.id_dropout=0.2"} <= set(load_script(name).parse_args(argv).override), argv
        else:
            assert ablation not in argv
    assert seen == takes_a_model
    assert all(ablation not in argv for _, *argv in gpu_sh_calls(tmp_path / "plain", ["cached", "sample"]))
