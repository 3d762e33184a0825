import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from id2face.config import ConfigError, load_config, packaged_config_path, save_config, split_args

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_default_has_the_sections_of_the_design():
    cfg = load_config()
    assert list(cfg.keys()) == ["run", "model", "data", "trainer", "eval"]


def test_layers_apply_in_order_then_overrides(tmp_path):
    first = write(tmp_path, "first.yaml", "data:\n  batch_size: 3\n  num_workers: 1\n")
    second = write(tmp_path, "second.yaml", "data:\n  batch_size: 5\n")
    cfg = load_config([first, second], ["data.num_workers=7"])
    assert cfg.data.batch_size == 5  # later file wins
    assert cfg.data.num_workers == 7  # command line wins over files
    assert cfg.data.image_size == load_config().data.image_size  # untouched keys keep the default


def test_bare_name_resolves_to_packaged_config():
    cfg = load_config(["tiny"])
    assert cfg.data.image_size == 32
    assert packaged_config_path("tiny").is_file()


def test_misspelt_key_in_file_names_key_and_file(tmp_path):
    bad = write(tmp_path, "typo.yaml", "data:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config([bad])
    assert "typo.yaml" in str(err.value) and "data.batch_sise" in str(err.value)
    assert "batch_size" in str(err.value)  # the valid keys are listed


def test_misspelt_key_on_command_line():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'trainer.max_stepz'"):
        load_config(["tiny"], ["trainer.max_stepz=3"])


def test_swapping_a_component_replaces_its_params(tmp_path):
    base = load_config()
    assert base.model.identity_encoder.name == "facenet" and "weights" in base.model.identity_encoder.params
    swap = write(tmp_path, "swap.yaml", "model:\n  identity_encoder:\n    name: timm\n    params:\n      embed_dim: 128\n")
    cfg = load_config([swap])
    assert cfg.model.identity_encoder.name == "timm"
    assert OmegaConf.to_container(cfg.model.identity_encoder.params) == {"embed_dim": 128}


def test_a_swap_keeps_the_params_it_lists_at_the_runs_values(tmp_path):
    """`keep_params`: an ablation that changes the variant and nothing else, on any base."""
    swap = write(tmp_path, "swap.yaml", "model:\n  id_vae:\n    name: deterministic\n"
                                         "    keep_params: [latent_dim, width]\n    params:\n      norm_momentum: 0.1\n")
    cfg = load_config(["tiny", swap])
    # the run's latent_dim (tiny's 16, not the class default 64); no width in the run's node to keep
    assert OmegaConf.to_container(cfg.model.id_vae) == {
        "name": "deterministic", "params": {"latent_dim": 16, "norm_momentum": 0.1}}
    one = write(tmp_path, "one.yaml", "model:\n  id_vae:\n    name: deterministic\n    keep_params: latent_dim\n")
    assert OmegaConf.to_container(load_config(["tiny", one]).model.id_vae.params) == {"latent_dim": 16}
    same = write(tmp_path, "same.yaml", "model:\n  id_vae:\n    name: vae\n    keep_params: [latent_dim]\n")
    assert load_config(["tiny", same]).model.id_vae == load_config(["tiny"]).model.id_vae  # no swap, nothing reset


def test_swap_from_command_line_then_set_new_params():
    cfg = load_config(["tiny"], ["model.harmonizer.name=sum", "model.harmonizer.params.extra=1"])
    assert OmegaConf.to_container(cfg.model.harmonizer) == {"name": "sum", "params": {"extra": 1}}


def test_same_variant_merges_params():
    cfg = load_config(["tiny"], ["model.id_vae.params.latent_dim=9"])
    assert cfg.model.id_vae.params.latent_dim == 9
    assert cfg.model.id_vae.params.hidden_dim == load_config(["tiny"]).model.id_vae.params.hidden_dim


def test_missing_file_and_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(["no/such/file.yaml"])
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_config([write(tmp_path, "broken.yaml", "data: [unclosed\n")])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["=3"])


def test_a_number_key_given_a_word_names_the_key_and_the_layer(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"^command line: data\.batch_size takes a number \(it was \d+\), got 'eight'$"):
        load_config(["tiny"], ["data.batch_size=eight"])
    layer = write(tmp_path, "optim.yaml", "model:\n  optim:\n    lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{layer}: model\.optim\.lr takes a number"):
        load_config(["tiny", layer])
    # What may stand where a number was: a string that reads as one, null, a list, an interpolation.
    cfg = load_config(["tiny"], ["model.optim.lr='1e-4'", "model.id_vae.params.beta=null",
                                 "model.backbone.params.attention_head_dim=[4,8]", "run.seed=${data.split_seed}",
                                 "data.split_seed=3"])
    assert float(cfg.model.optim.lr) == 1e-4 and cfg.model.id_vae.params.beta is None
    assert list(cfg.model.backbone.params.attention_head_dim) == [4, 8] and cfg.run.seed == 3


@pytest.mark.parametrize("override, message", [
    ("run.seed=-1", r"run\.seed takes a whole number 0\.\.4294967295, got -1"),
    ("data.split_seed=4294967296", r"data\.split_seed takes a whole number 0\.\.4294967295, got 4294967296"),
    ("data.image_size=null", r"data\.image_size takes a whole number >= 1, got None"),
    ("data.batch_size=2.5", r"data\.batch_size takes a whole number >= 1, got 2\.5"),
    ("data.num_workers=true", r"data\.num_workers takes a whole number >= 0, got True"),
    ("run.checkpoint_every_n_steps=-1", r"run\.checkpoint_every_n_steps takes a whole number >= 0, got -1"),
    ("model.context_dim=null", r"model\.context_dim takes a whole number >= 1, got None"),
    ("model.optim.warmup_steps=null", r"model\.optim\.warmup_steps takes a whole number >= 0, got None"),
    ("model.optim.ema_every=2.5", r"model\.optim\.ema_every takes a whole number >= 1, got 2\.5"),
    ("eval.limit=0", r"eval\.limit takes a whole number >= 1 or null, got 0"),
    ("trainer.max_steps=1.5", r"trainer\.max_steps takes a whole number >= -1, got 1\.5"),
    ("model.optim.fused=maybe", r"model\.optim\.fused is true or false, got 'maybe'"),
    # Lightning takes these, then divides by zero mid-run or ascends the gradient
    ("trainer.accumulate_grad_batches=0", r"trainer\.accumulate_grad_batches must be >= 1, got 0"),
    ("trainer.val_check_interval=0", r"trainer\.val_check_interval must be > 0, got 0"),
    ("trainer.gradient_clip_val=-1", r"trainer\.gradient_clip_val must be >= 0, got -1"),
])
def test_the_frameworks_own_settings_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(["tiny"], [override])


def test_counts_written_as_whole_floats_or_digit_strings_pass():
    cfg = load_config(["tiny"], ["data.batch_size=4.0", "run.seed='7'", "run.log_images_every_n_steps=0"])
    assert int(cfg.data.batch_size) == 4 and int(cfg.run.seed) == 7


def test_a_section_given_a_value_names_the_section_and_its_keys(tmp_path):
    # OmegaConf itself lets a scalar replace a whole node: the run would fail far from the cause.
    with pytest.raises(ConfigError, match=r"^command line: model\.backbone is a section \(keys: name, params\), "
                                          r"got 3; set one of its keys \(model\.backbone\.KEY=VALUE\)$"):
        load_config(["tiny"], ["model.backbone=3"])
    with pytest.raises(ConfigError, match=r"model\.optim is a section .*got None"):
        load_config(["tiny"], ["model.optim=null"])
    layer = write(tmp_path, "flat.yaml", "model: 3\n")
    with pytest.raises(ConfigError, match=rf"^{layer}: model is a section \(keys: context_dim, identity_encoder"):
        load_config(["tiny", layer])
    with pytest.raises(ConfigError, match=r"data\.batch_size takes a number \(it was \d+\), got \{'a': 1\}"):
        load_config(["tiny"], ["data.batch_size={a: 1}"])
    # OmegaConf's own merge raised a bare TypeError here.
    with pytest.raises(ConfigError, match=r"^command line: eval\.recognizers takes a list, got a mapping: write it as"):
        load_config(["tiny"], ["eval.recognizers={name: dlib}"])


def test_an_override_whose_value_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"^override 'data\.dataset=\{name:x,params:\{root:/d\}\}': .*found "
                                          r"unexpected ':' \(YAML wants a space after each colon"):
        load_config(["tiny"], ["run.seed=1", "data.dataset={name:x,params:{root:/d}}"])
    with pytest.raises(ConfigError, match=r"^override 'model\.optim\.betas=\[0\.9': .*flow sequence.*[^)]$"):
        load_config(["tiny"], ["model.optim.betas=[0.9"])
    cfg = load_config(["tiny"], ["data.dataset={name: synthfaces, params: {num_identities: 5}}"])
    assert cfg.data.dataset.params.num_identities == 5


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(["tiny"], ["run.seed=3"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config([str(path)])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_split_args():
    assert split_args(["tiny", "a.b=1", "x.yaml"]) == (["tiny", "x.yaml"], ["a.b=1"])


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "id2face.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_cli_config_prints_resolved_yaml():
    out = run_cli("config", "tiny", "data.batch_size=2")
    assert out.returncode == 0, out.stderr
    assert OmegaConf.create(out.stdout).data.batch_size == 2


def test_cli_config_error_is_one_line_without_traceback():
    out = run_cli("config", "tiny", "model.harmonizr.name=x")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "model.harmonizr" in out.stderr


def test_cli_help_is_fast_and_lists_every_command():
    start = time.perf_counter()
    out = run_cli("--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0
    for command in ("config", "synthfaces", "train", "eval", "anonymize", "prepare", "sweep", "table", "export", "demo"):
        assert command in out.stdout
    assert elapsed < 2.0, f"id2face --help took {elapsed:.2f} s"


def test_cli_help_does_not_import_heavy_libraries():
    code = ("import sys; from id2face.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'lightning', 'diffusers', 'torchmetrics', 'timm') if m in sys.modules]\n"
            "print('HEAVY:' + ','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:", f"imported at --help: {out.stdout[-200:]}"
