"""Hugging Face interop: random-weight transformers models built locally, compared in fp32."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from megamesh.errors import ConfigError
from megamesh.model.hf import load_hf, save_hf
from megamesh.model.source import model_config
from megamesh.model.transformer import forward
from megamesh.pytree import unflatten

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)


def make_llama(path, tie=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(**COMMON, tie_word_embeddings=tie, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def make_mixtral(path):
    torch.manual_seed(0)
    cfg = MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def ours(path, tokens):
    cfg, flat = load_hf(path)
    params = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(positions), cfg=cfg).logits)


def theirs(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def assert_close_relative(a, b, tol=1e-4):
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert rel < tol, rel


# 40 positions > original_max_position_embeddings=32 so the llama3 scaling bands all matter.
TOKENS = np.random.RandomState(0).randint(0, 320, (2, 40))


@pytest.mark.parametrize("maker", [make_llama, make_mixtral, lambda p: make_llama(p, tie=True)],
                         ids=["llama", "mixtral", "llama-tied"])
def test_logits_match_transformers(tmp_path, maker):
    model = maker(tmp_path / "hf")
    assert_close_relative(ours(tmp_path / "hf", TOKENS), theirs(model, TOKENS))


@pytest.mark.parametrize("maker", [make_llama, make_mixtral], ids=["llama", "mixtral"])
def test_export_then_import_is_exact_and_transformers_loads_it(tmp_path, maker):
    model = maker(tmp_path / "hf")
    cfg, flat = load_hf(tmp_path / "hf")
    save_hf(cfg, flat, tmp_path / "out")
    cfg2, flat2 = load_hf(tmp_path / "out")
    assert cfg2.replace(name=cfg.name) == cfg
    assert flat2.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(flat2[k], flat[k])
    reloaded = type(model).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    np.testing.assert_array_equal(theirs(reloaded, TOKENS), theirs(model, TOKENS))


def test_export_never_overwrites(tmp_path):
    make_llama(tmp_path / "hf")
    cfg, flat = load_hf(tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        save_hf(cfg, flat, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_model_directory_resolves_as_a_model(tmp_path):
    make_mixtral(tmp_path / "mix")
    cfg = model_config(str(tmp_path / "mix"), {"max_seq_len": "512"})
    assert cfg.moe.n_experts == 4 and cfg.n_kv_heads == 2 and cfg.max_seq_len == 512


def test_unsupported_checkpoint_is_a_clear_error(tmp_path):
    make_llama(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    data["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*not supported"):
        load_hf(tmp_path / "hf")


def test_bfloat16_weights_import_in_a_process_without_jax_loaded(tmp_path):
    """Most published checkpoints are bf16 safetensors, which numpy alone cannot name."""
    import subprocess
    import sys

    model = make_llama(tmp_path / "hf")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    code = ("import sys; from megamesh.model.hf import load_hf; cfg, flat = load_hf(sys.argv[1]); "
            "print(flat['embed'].dtype, 'jax' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bf16")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["bfloat16", "False"]
    _, flat = load_hf(tmp_path / "bf16")
    want = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(flat["embed"].astype(np.float32), want)
