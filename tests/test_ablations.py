"""Every ablation and experiment file loads, builds and runs one training batch + a short sampling
on the tiny CPU profile. The folders are listed here, never a hand-kept list of names."""
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from id2face.config import load_config
from id2face.model import ID2Face

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((REPO / "ablations").glob("*.yaml"))
# Sweep grids (*.sweep.yaml) are not config layers.
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if not p.name.endswith(".sweep.yaml"))
SWEEPS = sorted((REPO / "experiments").rglob("*.sweep.yaml"))

pytestmark = pytest.mark.filterwarnings("ignore:tiny identity encoder has no weights")



@pytest.fixture(scope="module")
def batch():
    from id2face.data.synthfaces import render_sample

    return {side: default_collate([render_sample(i, sample, 32) for i in range(2)])
            for side, sample in (("a", 0), ("b", 1))}


def one_batch_and_a_sample(cfg, batch):
    torch.manual_seed(0)
    model = ID2Face.from_config(cfg.model)
    model.train()
    losses = model.training_losses(batch)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    # Every trainable parameter takes part (DDP without find_unused_parameters needs that).
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    model.eval()
    images, masks = batch["a"]["image"], batch["a"]["mask"]
    out = model.anonymize(images, masks, generator=torch.Generator().manual_seed(0), key="test-key",
                          num_inference_steps=2)
    outside = masks.expand_as(images) == 0
    assert torch.equal(out[outside], images[outside])
    return model


def test_there_are_ablations():
    assert len(ABLATIONS) >= 10


def test_tiny_default_runs_one_batch(batch):
    one_batch_and_a_sample(load_config(["tiny"]), batch)


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_file_touches_one_subtree_and_says_what_it_tests(path):
    text = path.read_text()
    assert text.startswith("# ") and len(text.splitlines()[0]) > 20, "first line: a comment saying what it tests"
    layer = yaml.safe_load(text)
    assert list(layer) == ["run", "model"] and len(layer["model"]) == 1, "an ablation touches one model subtree"
    # `id2face train tiny <ablation>` trains in a folder of its own, not in (and over) the base run's
    assert layer["run"] == {"ablation": path.stem}
    tiny, ablated = load_config(["tiny"]), load_config(["tiny", str(path)])
    assert OmegaConf.to_container(tiny.model) != OmegaConf.to_container(ablated.model), "the file changes nothing"


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_runs_one_training_batch(path, batch):
    cfg = load_config(["tiny", str(path)])
    model = one_batch_and_a_sample(cfg, batch)
    (role, node), = yaml.safe_load(path.read_text())["model"].items()
    if "name" in node:  # the swap took effect in the built model
        assert getattr(model, role).registered_name == node["name"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(REPO / "experiments")) for p in EXPERIMENTS])
def test_experiment_runs_one_training_batch_on_the_tiny_profile(path, batch):
    # The experiment first, then `tiny` shrinks it to the CPU profile; pretrained files that only
    # exist on a cluster are replaced by random initialisation (their loaders have their own tests).
    shrink = ["model.backbone.params.pretrained=null", "model.identity_encoder.params.weights=null"]
    one_batch_and_a_sample(load_config([str(path), "tiny"], shrink), batch)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_expands_to_valid_tasks(path, monkeypatch):
    from id2face.launch.sweep import load_sweep

    monkeypatch.chdir(REPO)  # sweep files name configs relative to the repository root
    sweep = load_sweep(path)
    assert len(sweep.tasks) >= 2 and len({t.name for t in sweep.tasks}) == len(sweep.tasks)


def _effective_params(role: str, node) -> dict:
    """A component node's constructor values: its params over the variant's own defaults."""
    from id2face.registry import MODEL_ROLES

    signature = inspect.signature(MODEL_ROLES[role].get(node.name).__init__)
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
    return {**defaults, **OmegaConf.to_container(node.params)}


SWAPS = [path for path in ABLATIONS if "name" in next(iter(yaml.safe_load(path.read_text())["model"].values()))]


@pytest.mark.parametrize("base", [["tiny"], [], ["tiny", "experiments/synthfaces.yaml"]],
                         ids=["tiny", "default", "synthfaces"])
@pytest.mark.parametrize("path", SWAPS, ids=[p.stem for p in SWAPS])
def test_an_ablation_that_swaps_a_variant_keeps_the_params_both_variants_take(path, base, monkeypatch):
    """Swapping a variant resets its params to the class defaults: on a base with other sizes (tiny,
    SynthFaces) the ablation would change those too. What both variants take keeps the run's value
    (`keep_params`), unless the file sets it on purpose."""
    monkeypatch.chdir(REPO)
    (role, node), = yaml.safe_load(path.read_text())["model"].items()
    before = load_config(base).model[role]
    after = load_config([*base, str(path)]).model[role]
    old, new = _effective_params(role, before), _effective_params(role, after)
    set_by_file = set(node.get("params") or {})
    shared = (set(old) & set(new)) - set_by_file
    assert {p: new[p] for p in shared} == {p: old[p] for p in shared}


@pytest.mark.parametrize("base", [["tiny"], []], ids=["tiny", "default"])
def test_unmasked_attribute_ablation_changes_only_the_masking(base):
    """A confound otherwise: swapping the variant's name would reset its sizes to the class defaults."""
    plain = load_config(base).model.attribute_encoder
    ablated = load_config([*base, str(REPO / "ablations" / "attributes_unmasked.yaml")]).model.attribute_encoder
    assert ablated.name == plain.name
    assert OmegaConf.to_container(ablated.params) == {**OmegaConf.to_container(plain.params), "hide_identity": False}
