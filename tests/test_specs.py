"""Parameter specs and counts, checked against hand-computed values; no jax on import."""


from megamesh.config import preset
from megamesh.model import specs


def test_llama31_8b_by_hand():
    cfg = preset("llama3.1-8b")
    D, L, V, F, Dh = 4096, 32, 128256, 14336, 128
    attn = D * 32 * Dh + 2 * D * 8 * Dh + 32 * Dh * D
    mlp = 3 * D * F
    norms = 2 * D
    total = V * D * 2 + L * (attn + mlp + norms) + D
    assert specs.param_count(cfg) == total == 8_030_261_248
    matmul = L * (attn + mlp) + D * V  # the embedding lookup is not a matmul; the head is
    assert specs.matmul_param_count(cfg) == matmul
    S = 8192
    attention = 4 * S * 32 * Dh * L / 2  # causal counted once
    assert specs.flops_per_token(cfg, S, "train") == 6 * matmul + 3 * attention
    assert specs.flops_per_token(cfg, S, "forward") == 2 * matmul + attention
    assert specs.kv_cache_bytes_per_token(cfg) == 2 * L * 8 * Dh * 2  # bf16


def test_mixtral_by_hand():
    cfg = preset("mixtral-8x7b")
    D, L, V, F, E = 4096, 32, 32000, 14336, 8
    attn = 2 * D * 4096 + 2 * D * 1024
    experts = E * 3 * D * F
    router = D * E
    total = 2 * V * D + L * (attn + experts + router + 2 * D) + D
    assert specs.param_count(cfg) == total
    active = total - L * experts * (E - 2) // E
    assert specs.active_param_count(cfg) == active
    matmul = L * (attn + experts * 2 // E + router) + D * V
    assert specs.matmul_param_count(cfg) == matmul
    assert specs.flops_per_token(cfg, 4096, "train") == 6 * matmul + 3 * (4 * 4096 * 4096 * L / 2)


def test_spec_table_axes_match_shapes():
    for name in ("tiny", "tiny-moe", "deepseek-v3"):
        table = specs.param_specs(preset(name))
        for s in table.values():
            assert len(s.axes) == len(s.shape), s
    ds = specs.param_specs(preset("deepseek-v3"))
    assert ds["dense_layers/mlp/w_gate"].shape == (3, 7168, 18432)
    assert ds["layers/moe/w_gate"].shape == (58, 256, 7168, 2048)
    assert ds["layers/moe/shared/w_gate"].shape == (58, 7168, 2048)
