"""M2AEConfig: validation, named variants, dict round trip (what checkpoints store)."""
import pytest

from m2ae_infer import M2AEConfig


@pytest.mark.parametrize("bad", [dict(channels=0), dict(channels=True), dict(channels=2.0), dict(num_blocks=-1),
                                 dict(act="tanh"), dict(motion_points=1)])
def test_invalid_fields_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        M2AEConfig(**bad)


@pytest.mark.parametrize("name", ["tiny", "default", "large"])
def test_variants_round_trip_through_dict(name):
    cfg = M2AEConfig.from_name(name)
    assert M2AEConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_names_and_keys_are_errors():
    with pytest.raises(ValueError, match="unknown config name"):
        M2AEConfig.from_name("huge")
    with pytest.raises(ValueError, match="widht"):
        M2AEConfig.from_dict({"widht": 3})


def test_spec_is_a_variant_with_field_overrides():
    spec = M2AEConfig.from_spec("tiny, mask_channels=12 ,act=relu")
    assert spec == M2AEConfig(**{**M2AEConfig.from_name("tiny").to_dict(), "mask_channels": 12, "act": "relu"})
    assert M2AEConfig.from_spec("large") == M2AEConfig.from_name("large")


@pytest.mark.parametrize("spec, needle", [("huge", "unknown config name"), ("default,widht=3", "widht"),
                                          ("default,mask_channels", "KEY=VALUE"), ("default,=3", "KEY=VALUE"),
                                          ("default,mask_channels=x", "mask_channels"),
                                          ("default,mask_layers=0", "mask_layers")])
def test_bad_specs_are_errors(spec, needle):
    with pytest.raises(ValueError, match=needle):
        M2AEConfig.from_spec(spec)
