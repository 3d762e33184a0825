import pytest

from id2face import registry
from id2face.registry import Registry, RegistryError


def make_registry():
    reg = Registry("widget")

    @reg.register("null")
    class Null:
        def __init__(self, width: int = 4):
            self.width = width

    @reg.register("scaled")
    class Scaled:
        def __init__(self, scale: float = 1.0, in_dim: int = 0):
            self.scale, self.in_dim = scale, in_dim

    return reg, Null, Scaled


def test_build_by_short_name_with_params_and_runtime_facts():
    reg, Null, Scaled = make_registry()
    built = reg.build({"name": "scaled", "params": {"scale": 2.5}}, in_dim=7)
    assert isinstance(built, Scaled) and built.scale == 2.5 and built.in_dim == 7
    # a runtime fact the constructor does not take is not forced on it
    assert reg.build({"name": "null", "params": {"width": 3}}, in_dim=7).width == 3
    assert isinstance(reg.build("null"), Null)


def test_unknown_name_lists_valid_names():
    reg, *_ = make_registry()
    with pytest.raises(RegistryError, match=r"unknown widget 'nope'; valid names: null, scaled"):
        reg.build({"name": "nope"})


def test_duplicate_registration_fails():
    reg, *_ = make_registry()
    with pytest.raises(RegistryError, match="already registered"):
        @reg.register("null")
        class Other:
            pass


def test_unknown_param_names_the_valid_ones():
    reg, *_ = make_registry()
    with pytest.raises(RegistryError, match=r"'scaled' has no parameter 'scael'; valid: scale"):
        reg.build({"name": "scaled", "params": {"scael": 1.0}}, in_dim=3)


def test_omegaconf_params_arrive_as_plain_python():
    from omegaconf import OmegaConf

    reg = Registry("holder")

    @reg.register("keeps")
    class Keeps:
        def __init__(self, sizes=(), opts=None):
            self.sizes, self.opts = sizes, opts

    node = OmegaConf.create({"name": "keeps", "params": {"sizes": [1, 2], "opts": {"a": 1}}})
    built = reg.build(node)
    assert built.sizes == [1, 2] and type(built.sizes) is list and type(built.opts) is dict


@pytest.mark.parametrize("role, reg", sorted(registry.MODEL_ROLES.items()))
def test_every_model_role_has_entries_that_import(role, reg):
    assert reg.names(), f"{role} registry is empty"


def test_model_roles_cover_the_config():
    from id2face.config import load_config

    cfg = load_config()
    assert set(registry.MODEL_ROLES) <= set(cfg.model.keys())
