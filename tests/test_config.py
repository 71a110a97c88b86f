"""Config: presets match published counts; files, overrides and bad configs."""

import json

import pytest

from megamesh.config import PRESETS, apply_overrides, config_from_dict, load_config_file, preset
from megamesh.errors import ConfigError
from megamesh.model.specs import active_param_count, param_count


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if c.published_params])
def test_published_presets_match_published_counts(name):
    cfg = preset(name)
    total, active = cfg.published_params
    assert abs(param_count(cfg) / total - 1) < 0.01, (param_count(cfg), total)
    assert abs(active_param_count(cfg) / active - 1) < 0.01, (active_param_count(cfg), active)
    assert cfg.published_source


def test_tiny_and_frontier_sizes():
    assert 10e6 <= param_count(preset("tiny")) <= 30e6
    assert 1.9e12 <= param_count(preset("frontier-2t")) <= 2.1e12


def test_deepseek_stand_in_is_disclosed():
    assert "STAND-IN" in preset("deepseek-v3").description


def test_unknown_preset_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown preset 'llama-9b'.*llama3.1-8b"):
        preset("llama-9b")


BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_heads=5), "n_heads"),  # does not divide d_model
        (dict(n_kv_heads=3), "n_kv_heads"),  # does not divide n_heads
        (dict(moe=dict(n_experts=4, top_k=5, d_ff_expert=8)), "moe.top_k"),
        (dict(compute_dtype="float64"), "compute_dtype"),
        (dict(d_model=0), "d_model"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        config_from_dict({**BASE, **changes})


def test_unknown_key_and_missing_key():
    with pytest.raises(ConfigError, match="unknown config key 'n_layer'.*allowed keys"):
        config_from_dict({**BASE, "n_layer": 3})
    with pytest.raises(ConfigError, match="unknown config key 'moe.experts'"):
        config_from_dict({**BASE, "moe": {"experts": 4}})
    with pytest.raises(ConfigError, match="missing required keys: d_ff"):
        config_from_dict({k: v for k, v in BASE.items() if k != "d_ff"})


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(preset("tiny-moe"), {"n_layers": "2", "moe.top_k": "1", "tie_embeddings": "true",
                                                "moe.capacity_factor": "1.5"})
    assert (cfg.n_layers, cfg.moe.top_k, cfg.tie_embeddings, cfg.moe.capacity_factor) == (2, 1, True, 1.5)
    with pytest.raises(ConfigError, match="unknown override key 'n_layer'"):
        apply_overrides(preset("tiny"), {"n_layer": "2"})
    with pytest.raises(ConfigError, match="unknown override key 'moe.topk'"):
        apply_overrides(preset("tiny-moe"), {"moe.topk": "2"})
    with pytest.raises(ConfigError, match="n_layers='two'.*integer"):
        apply_overrides(preset("tiny"), {"n_layers": "two"})
    with pytest.raises(ConfigError, match="moe.top_k=9"):
        apply_overrides(preset("tiny-moe"), {"moe.top_k": "9"})


def test_config_files_json_and_yaml(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({**BASE, "rope_scaling": {"factor": 4.0}}))
    cfg = load_config_file(tmp_path / "m.json")
    assert cfg.d_model == 32 and cfg.rope_scaling.factor == 4.0
    (tmp_path / "m.yaml").write_text("base: tiny\nn_layers: 2\nrope_theta: 5.0e5\n")
    cfg = load_config_file(tmp_path / "m.yaml")
    assert (cfg.n_layers, cfg.d_model, cfg.rope_theta) == (2, preset("tiny").d_model, 5e5)
    (tmp_path / "bad.yaml").write_text("n_layers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.json")


def test_roundtrip_through_dict():
    for cfg in PRESETS.values():
        d = cfg.to_dict()
        assert config_from_dict(d) == cfg
