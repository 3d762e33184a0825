"""`id2face table`: numbers in md / latex / csv equal the runs' metrics.json; seeds, layouts, errors."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from id2face.cli import main
from id2face.metrics.table import METRIC_KINDS, save_metrics

META = {"recognizers": {"dlib": "dlib ResNet 128-d (Euclidean, same person iff distance < 0.6)"},
        "fid": "FID on Inception-v3 pool3 2048-d features (torch-fidelity pt_inception-2015-12-05), real vs anonymized",
        "far": 0.001, "attributes": "MTCNN 5-point geometric pose (degrees) and expression ratios"}

RUNS = {
    "ours": {"fid": 12.3456, "dlib/top1": 0.0123, "dlib/top5": 0.0456, "dlib/vr": 0.0071, "pose": 3.217,
             "expression": 0.0512, "dlib/diversity": 0.4321},
    "fams": {"fid": 15.5, "dlib/top1": 0.0991, "dlib/top5": 0.2104, "dlib/vr": 0.0533, "pose": 2.904,
             "expression": 0.0633, "dlib/diversity": 0.3017},
    "blur": {"fid": 48.02, "dlib/top1": 0.3102, "dlib/top5": 0.4988, "dlib/vr": 0.2876, "pose": 5.771,
             "expression": 0.0814, "dlib/diversity": 0.0},
}


def _write_run(root, experiment, metrics, ablation="base", seed=0, encoder="facenet", meta=META):
    folder = root / experiment / ablation / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"run:\n  experiment: {experiment}\n  ablation: {ablation}\n  seed: {seed}\n"
        f"model:\n  identity_encoder:\n    name: {encoder}\n    params: {{}}\n")
    save_metrics(folder, metrics, meta)
    return folder


@pytest.fixture
def three_runs(tmp_path):
    return [_write_run(tmp_path / "runs", name, metrics) for name, metrics in RUNS.items()]


def _table(capsys, *args):
    code = main(["table", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _decimals(key):
    return METRIC_KINDS[key.split("/")[-1]].decimals


def test_markdown_numbers_equal_metrics_json(three_runs, capsys):
    text = _table(capsys, *three_runs, "--format", "md")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "Run" and "FID ↓" in header and "Top-1 ↓" in header and "dlib Div. ↑" in header
    assert "VR@0.001 ↓" in header
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == set(RUNS)
    labels = {"FID ↓": "fid", "Top-1 ↓": "dlib/top1", "Top-5 ↓": "dlib/top5", "VR@0.001 ↓": "dlib/vr",
              "Pose err. ↓": "pose", "Expr. err. ↓": "expression", "dlib Div. ↑": "dlib/diversity"}
    assert set(header[1:]) == set(labels)
    for name, cells in rows.items():
        for label, cell in zip(header[1:], cells):
            key = labels[label]
            assert cell.strip("*") == f"{RUNS[name][key]:.{_decimals(key)}f}", (name, key)
    # best per column in bold: lowest FID / retrieval / VR / expression, lowest pose (fams), highest diversity
    assert rows["ours"][header.index("FID ↓") - 1].startswith("**")
    assert rows["fams"][header.index("Pose err. ↓") - 1].startswith("**")
    assert rows["ours"][header.index("dlib Div. ↑") - 1].startswith("**")
    assert not rows["blur"][header.index("FID ↓") - 1].startswith("**")
    caption = text.split("Table: ", 1)[1]
    assert "dlib ResNet 128-d" in caption and "pt_inception-2015-12-05" in caption and "FAR 0.001" in caption


def test_latex_numbers_equal_metrics_json(three_runs, tmp_path, capsys):
    out = tmp_path / "table.tex"
    code = main(["table", *map(str, three_runs), "--format", "latex", "-o", str(out)])
    assert code == 0
    text = out.read_text()
    assert r"\begin{tabular}" in text and r"\caption{" in text and r"$\downarrow$" in text and r"$\uparrow$" in text
    header_line = next(line for line in text.splitlines() if line.startswith("Run &"))
    header = [h.strip().rstrip("\\").strip() for h in header_line.split("&")]
    body = [line for line in text.splitlines() if line.split(" & ")[0] in RUNS]
    assert len(body) == 3
    order = ["dlib/top1", "dlib/top5", "dlib/vr", "fid", "pose", "expression", "dlib/diversity"]
    assert header[1].startswith("Top-1") and header[4].startswith("FID")
    for line in body:
        cells = [c.strip().removesuffix(r"\\").strip() for c in line.split(" & ")]
        name = cells[0]
        for key, cell in zip(order, cells[1:]):
            value = re.sub(r"\\textbf\{(.*)\}", r"\1", cell)
            assert value == f"{RUNS[name][key]:.{_decimals(key)}f}", (name, key)
    assert r"\textbf{12.35}" in text


def test_csv_full_precision_equals_metrics_json(three_runs, capsys):
    text = _table(capsys, *three_runs, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["run"] for r in rows] == list(RUNS)
    for row in rows:
        assert row["n"] == "1"
        for key, value in RUNS[row["run"]].items():
            assert float(row[key]) == value
            assert row[f"{key}_std"] == ""


def test_seeds_become_mean_and_std(tmp_path, capsys):
    root = tmp_path / "runs"
    values = [0.10, 0.14, 0.18]
    runs = [_write_run(root, "ours", {"fid": 10.0 + i, "dlib/top1": v}, seed=i) for i, v in enumerate(values)]
    runs.append(_write_run(root, "other", {"fid": 20.0, "dlib/top1": 0.5}))
    text = _table(capsys, *runs, "--format", "md")
    row = next(line for line in text.splitlines() if line.startswith("| ours"))
    assert "**0.140 ± 0.040**" in row and "**11.00 ± 1.00**" in row
    assert "mean ± std over seeds" in text
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(_table(capsys, *runs, "--format", "csv")))}
    assert rows["ours"]["n"] == "3"
    assert float(rows["ours"]["dlib/top1"]) == pytest.approx(0.14)
    assert float(rows["ours"]["dlib/top1_std"]) == pytest.approx(0.04)


def test_evaluations_of_one_seed_keep_rows_of_their_own(tmp_path, capsys):
    """`id2face eval --run-dir` of one checkpoint under two arithmetics: same run name and seed,
    so not seeds to average; each is a row named by its folder, with its own numbers."""
    root = tmp_path / "evals"
    runs = []
    for folder, top1 in (("fp32", 0.342), ("bf16", 0.338)):
        run = root / folder
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("run:\n  experiment: demo\n  ablation: id2face\n  seed: 0\n")
        save_metrics(run, {"fid": 7.6, "dlib/top1": top1}, META)
        runs.append(run)
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(_table(capsys, *runs, "--format", "csv")))}
    assert set(rows) == {"demo (id2face) [fp32]", "demo (id2face) [bf16]"}
    assert [float(rows[f"demo (id2face) [{f}]"]["dlib/top1"]) for f in ("fp32", "bf16")] == [0.342, 0.338]
    assert {rows[name]["n"] for name in rows} == {"1"}


def test_rows_judged_by_different_oracles_are_flagged_in_the_caption(tmp_path, capsys):
    """Two oracles of one config trained on different processors judge differently; their weights'
    digest in the description tells them apart, and the caption says the rows are not comparable."""
    oracle = "SynthFaces oracle 64-d (cosine; 300 identities, held-out views: top-1 0.22; weights {})"
    same = [_write_run(tmp_path / "same", name, {"oracle/top1": 0.3},
                       meta={"recognizers": {"oracle": oracle.format("0127a26f")}}) for name in ("a", "b")]
    assert "oracle: SynthFaces" in _table(capsys, *same) and "differs" not in _table(capsys, *same)
    other = _write_run(tmp_path / "other", "c", {"oracle/top1": 0.3},
                       meta={"recognizers": {"oracle": oracle.format("9d8d0000")}})
    caption = _table(capsys, *same, other).split("Table: ", 1)[1]
    assert f"oracle differs between rows: {oracle.format('0127a26f')} / {oracle.format('9d8d0000')}" in caption


def test_ablation_and_encoder_layouts(tmp_path, capsys):
    root = tmp_path / "runs"
    meta = {**META, "recognizers": {**META["recognizers"], "oracle": "SynthFaces oracle 64-d (cosine)"}}
    runs = [
        _write_run(root, "tiny", {"fid": 5.0, "dlib/top1": 0.2, "oracle/top1": 0.3, "oracle/vr": 0.1},
                   ablation="harmonizer_sum", encoder="tiny", meta=meta),
        _write_run(root, "tiny", {"fid": 4.0, "dlib/top1": 0.1, "oracle/top1": 0.2, "oracle/vr": 0.05},
                   ablation="base", encoder="arcface", meta=meta),
    ]
    ablation = _table(capsys, *runs, "--layout", "ablation")
    assert "| harmonizer_sum |" in ablation and "| base |" in ablation
    encoders = _table(capsys, *runs, "--layout", "encoders")
    assert "| tiny |" in encoders and "| arcface |" in encoders
    header = encoders.splitlines()[0]
    assert "dlib Top-1 ↓" in header and "oracle Top-1 ↓" in header  # several judges: prefixed
    assert "SynthFaces oracle 64-d" in encoders


def test_bad_run_folder_is_a_one_line_error(tmp_path, three_runs, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["table", str(three_runs[0]), str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no metrics.json" in err and str(empty) in err
    assert main(["table", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (empty / "metrics.json").write_text("{not json")
    assert main(["table", str(empty)]) == 2
    assert "not an id2face metrics file" in capsys.readouterr().err


def test_pose_angles_of_eval_are_not_taken_for_a_recognizer(tmp_path, capsys):
    """`id2face eval` writes pose/yaw, pose/pitch, pose/roll beside dlib/...: one judge, not two."""
    runs = [_write_run(tmp_path / "runs", name, {**metrics, "pose/yaw": 4.0, "pose/pitch": 2.0, "pose/roll": 1.0})
            for name, metrics in RUNS.items()]
    text = _table(capsys, *runs, "--format", "md")
    header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("|")).strip("|").split("|")]
    assert "Top-1 ↓" in header and "dlib Top-1 ↓" not in header
    assert "Identity by dlib:" in text and "; pose" not in text


@pytest.mark.parametrize("config_text, said", [
    ("- a\n- b\n", "its top level is not a section"),
    ("run: exp1\n", "run is not a section"),
    ("run:\n  seed: ${oc.env:SEED}\n", "run.seed must be a whole number"),
    ("model:\n  identity_encoder: facenet\n", "identity_encoder is not a section"),
])
def test_run_config_of_another_shape_is_a_one_line_error(three_runs, capsys, config_text, said):
    (three_runs[0] / "config.yaml").write_text(config_text)
    assert main(["table", *map(str, three_runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err and "config.yaml" in err


def test_metrics_json_round_trip_keeps_nan_as_missing(tmp_path, capsys):
    folder = tmp_path / "solo"
    save_metrics(folder, {"fid": float("nan"), "dlib/top1": 0.25}, META)
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["fid"] is None
    text = _table(capsys, folder)
    row = next(line for line in text.splitlines() if line.startswith("| solo"))
    assert "0.250" in row and "FID" not in text.splitlines()[0]  # no value anywhere: no FID column


def test_eval_of_a_checkpoint_outside_a_run_folder_writes_under_runs_eval(tmp_path, monkeypatch, capsys):
    """The shipped demo checkpoint sits in the repository's checkpoints/, no run folder: eval's
    default output is runs/eval/<name> in the working folder, never the checkpoint's parent."""
    import shutil

    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "checkpoints" / "demo-tiny.pt", project / "checkpoints")
    monkeypatch.chdir(project)
    assert main(["eval", "--checkpoint", "checkpoints/demo-tiny.pt", "--limit", "2", "--no-reconstruction",
                 "--device", "cpu", "eval.recognizers=[{name: encoder, params: {encoder: tiny}}]"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in project.iterdir()) == ["checkpoints", "runs"]
    written = json.loads((project / "runs" / "eval" / "demo-tiny" / "metrics.json").read_text())
    assert written["meta"]["num_faces"] == 2 and 0 <= written["metrics"]["tiny/top1"] <= 1


@pytest.mark.parametrize("arguments, message", [
    (["eval.batch_size=0"], r"eval\.batch_size takes a whole number >= 1, got 0"),
    (["eval.far=1.5"], r"eval\.far must be in \[0, 1\], got 1\.5"),
    (["eval.diversity_k=0"], r"eval\.diversity_k takes a whole number >= 1, got 0"),
    (["--limit", "-2"], r"eval\.limit takes a whole number >= 1 or null, got -2"),
    (["eval.limit=2.5"], r"eval\.limit takes a whole number >= 1 or null, got 2\.5"),
])
def test_eval_with_an_impossible_setting_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, arguments,
                                                                    message):
    monkeypatch.chdir(tmp_path)
    checkpoint = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-tiny.pt"
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu", *arguments]) == 2
    assert re.fullmatch(rf"id2face eval: error: {message}", capsys.readouterr().err.strip())
    assert list(tmp_path.iterdir()) == []


def test_eval_limit_and_one_recognizer_name_from_the_config(tmp_path, monkeypatch, capsys):
    """``eval.limit`` in the config limits ``id2face eval`` as ``--limit`` does (it was read only by
    sweep tasks), and ``eval.recognizers`` may be one name instead of a list."""
    checkpoint = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-tiny.pt"
    assert main(["eval", "--checkpoint", str(checkpoint), "--no-reconstruction", "--device", "cpu",
                 "--run-dir", str(tmp_path), "eval.limit=3", "eval.recognizers=dlib", "eval.diversity_k=1"]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["meta"]["num_faces"] == 3 and list(written["meta"]["recognizers"]) == ["dlib"]
    assert "dlib/top1" in written["metrics"] and "dlib/diversity" not in written["metrics"]


@pytest.mark.slow
def test_eval_then_table_on_three_real_runs(tmp_path, capsys):
    """`id2face eval` on a (1-step) tiny checkpoint into three run folders (seeds 0, 1 of one
    experiment, one ablation), then `id2face table`: the table's numbers are the metrics.json ones."""
    import warnings

    import lightning as L

    from id2face.config import load_config
    from id2face.data.datamodule import FacePairDataModule
    from id2face.lit_module import ID2FaceModule

    data = ["data.dataset.params.num_identities=20", "data.dataset.params.samples_per_identity=4", "data.batch_size=4"]
    cfg = load_config(["tiny"], data)
    module = ID2FaceModule(cfg)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=FacePairDataModule(cfg.data))
    checkpoint = tmp_path / "train" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(checkpoint)

    oracle = (f"{{name: oracle, params: {{cache_dir: {tmp_path / 'oracle'}, train_if_missing: true, settings: "
              "{samples_per_identity: 3, steps: 5, batch_size: 8, width: 4, embed_dim: 8}}}")
    common = [*data, "eval.diversity_k=2", "model.sampler.params.num_inference_steps=2",
              f"eval.recognizers=[{oracle}, {{name: encoder, params: {{encoder: {{name: tiny}}}}}}]", "--limit", "6"]
    runs = []
    for experiment, ablation, seed in (("tiny", "base", 0), ("tiny", "base", 1), ("tiny", "harmonizer_sum", 0)):
        run_dir = tmp_path / "runs" / experiment / ablation / f"seed{seed}"
        args = ["eval", "--checkpoint", str(checkpoint), "--run-dir", str(run_dir), f"run.seed={seed}",
                f"run.ablation={ablation}", *common] + (["--no-reconstruction"] if seed else [])
        if ablation == "harmonizer_sum":
            args += ["--precision", "bf16-mixed"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(args) == 0
        assert (run_dir / "eval_config.yaml").is_file() and (run_dir / "config.yaml").is_file()
        runs.append(run_dir)
    capsys.readouterr()
    written = [json.loads((r / "metrics.json").read_text()) for r in runs]
    for payload in written:
        m = payload["metrics"]
        assert 0 <= m["oracle/top1"] <= m["oracle/top5"] <= 1 and 0 <= m["tiny/vr"] <= 1
        assert m["fid"] >= -1e-6 and m["oracle/diversity"] >= 0 and payload["meta"]["num_faces"] == 6
        assert set(payload["meta"]["recognizers"]) == {"oracle", "tiny"}
    assert written[0]["metrics"]["psnr"] > 0 and "psnr" not in written[1]["metrics"]
    # CPU default fp32; the bf16 run is recorded as such (its samples differ, its metrics still hold)
    assert [w["meta"]["precision"] for w in written] == ["32-true", "32-true", "bf16-mixed"]

    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(_table(capsys, *runs, "--layout", "ablation",
                                                                        "--format", "csv")))}
    assert set(rows) == {"base", "harmonizer_sum"} and rows["base"]["n"] == "2"
    for key in ("oracle/top1", "tiny/top1", "tiny/vr", "fid", "pose"):
        assert float(rows["harmonizer_sum"][key]) == written[2]["metrics"][key]
        expected = [w["metrics"][key] for w in written[:2]]
        assert float(rows["base"][key]) == pytest.approx(sum(expected) / 2)
    text = _table(capsys, runs[2], "--format", "md")
    row = next(line for line in text.splitlines() if line.startswith("| tiny (harmonizer_sum)"))
    assert f"{written[2]['metrics']['fid']:.2f}" in row and f"{written[2]['metrics']['tiny/top1']:.3f}" in row
    assert "SynthFaces-oracle features" in text
