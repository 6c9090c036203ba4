"""M2AEConfig: validation, named variants, dict round trip (what checkpoints store)."""
import dataclasses

import pytest

from m2ae_infer import M2AEConfig
from m2ae_infer.config import LIMITS, VARIANTS


@pytest.mark.parametrize("bad", [dict(channels=0), dict(channels=True), dict(channels=2.0), dict(num_blocks=-1),
                                 dict(act="tanh"), dict(motion_points=1)])
def test_invalid_fields_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        M2AEConfig(**bad)


@pytest.mark.parametrize("field", ["channels", "num_blocks", "ffn_expand", "mask_channels", "mask_layers",
                                   "motion_channels", "motion_points"])
def test_sizes_have_an_upper_bound(field):
    """Each size is accepted up to its documented limit and refused, in one line, one past it and at an absurd
    value (a damaged checkpoint asking for 10**9 blocks must not hang the loader)."""
    assert getattr(M2AEConfig(**{field: LIMITS[field]}), field) == LIMITS[field]
    for value in (LIMITS[field] + 1, 10**9):
        with pytest.raises(ValueError) as exc:
            M2AEConfig(**{field: value})
        message = str(exc.value)
        assert "\n" not in message and f"M2AEConfig.{field} must be at most {LIMITS[field]}, got {value}" in message
    with pytest.raises(ValueError, match=f"{field} must be at most"):
        M2AEConfig.from_spec(f"default,{field}=1000000000")


def test_limits_cover_every_int_field_and_sit_above_every_variant():
    ints = {f.name for f in dataclasses.fields(M2AEConfig) if f.type == "int"}
    assert set(LIMITS) == ints
    for name in VARIANTS:
        cfg = M2AEConfig.from_name(name).to_dict()
        assert all(cfg[k] * 4 <= LIMITS[k] for k in ("channels", "num_blocks", "mask_channels", "motion_channels"))


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
