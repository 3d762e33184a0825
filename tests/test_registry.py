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


def test_a_value_the_constructor_refuses_names_the_role_and_variant():
    from id2face.errors import UserError
    from id2face.registry import SAMPLERS, ComponentValueError

    reg = Registry("widget")

    @reg.register("positive")
    class Positive:
        def __init__(self, width: int = 4):
            if width < 1:
                raise ValueError(f"width must be >= 1, got {width}")

    with pytest.raises(ComponentValueError, match=r"^widget 'positive': width must be >= 1, got 0$") as err:
        reg.build({"name": "positive", "params": {"width": 0}})
    # The CLI prints it as one line; callers that catch ValueError still do.
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    with pytest.raises(ComponentValueError, match=r"^sampler 'ddim': num_inference_steps must be in 1\.\.1000"):
        SAMPLERS.build({"name": "ddim", "params": {"num_inference_steps": 0}}, train_scheduler=_train_scheduler())
    assert SAMPLERS.build({"name": "dpm_solver", "params": {"num_inference_steps": 1000}},
                          train_scheduler=_train_scheduler()).num_inference_steps == 1000


def test_a_type_error_is_the_users_only_where_a_param_is_of_another_kind_than_its_default():
    from id2face.registry import ComponentValueError

    reg = Registry("widget")

    @reg.register("sized")
    class Sized:
        def __init__(self, width: int = 4, widths: tuple = (1, 2), flag: bool = False, bug: bool = False):
            self.width = int(width) + len(widths)
            if bug:
                len(5)  # a bug of the component, not of the config: its traceback is kept

    with pytest.raises(ComponentValueError, match=r"^widget 'sized': int\(\) .* \(check width=None, default 4\)$"):
        reg.build({"name": "sized", "params": {"width": None}})
    with pytest.raises(ComponentValueError, match=r"\(check widths=3, default \(1, 2\)\)$"):
        reg.build({"name": "sized", "params": {"widths": 3}})
    assert reg.build({"name": "sized", "params": {"width": 2.0, "widths": [1], "flag": True}}).width == 3
    with pytest.raises(TypeError) as err:
        reg.build({"name": "sized", "params": {"bug": True}})
    assert not isinstance(err.value, ComponentValueError)


def test_a_switch_takes_true_or_false_only():
    from id2face.registry import BACKBONES

    reg, *_ = make_registry()

    @reg.register("switched")
    class Switched:
        def __init__(self, compile: bool = False, width: int = 2):
            self.compile = compile

    for value in ("no", "maybe", 1):
        with pytest.raises(RegistryError, match=rf"^widget 'switched': compile is true or false, got {value!r}$"):
            reg.check({"name": "switched", "params": {"compile": value, "width": 3}})
    assert reg.build({"name": "switched", "params": {"compile": True}}).compile is True
    with pytest.raises(RegistryError, match=r"backbone 'unet': gradient_checkpointing is true or false"):
        BACKBONES.check({"name": "unet", "params": {"gradient_checkpointing": "yes please"}})


def test_a_missing_required_param_is_named_before_the_constructor_runs():
    from id2face.registry import DATASETS

    with pytest.raises(RegistryError, match=r"^dataset 'celebahq' needs parameter 'root' in its params$"):
        DATASETS.build({"name": "celebahq", "params": {}})
    reg = Registry("widget")

    @reg.register("sized")
    class Sized:
        def __init__(self, in_dim: int, width: int, *, depth: int, scale: float = 1.0):
            self.in_dim, self.width, self.depth = in_dim, width, depth

    with pytest.raises(RegistryError, match=r"needs parameters 'depth', 'width' in its params"):
        reg.build({"name": "sized"}, in_dim=3)  # a runtime fact counts as given
    assert reg.build({"name": "sized", "params": {"width": 2, "depth": 1}}, in_dim=3).depth == 1


def _train_scheduler():
    from id2face.registry import SCHEDULERS

    return SCHEDULERS.build({"name": "ddpm", "params": {"num_train_timesteps": 1000}})


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
