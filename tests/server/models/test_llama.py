"""The Llama family against transformers: same config, same weights, same logits (fp32).

Each variant is a randomly initialised transformers model saved as an HF folder and read back
through `load_model`, so the HF folder loader is exercised too. The paged path runs the prompt in
one prefill, and in chunks plus decode steps mixed with a second sequence in the same batch.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from baton.server.attention import ForwardContext
from baton.server.attention.metadata import build_attention_metadata
from baton.server.attention.torch_backend import TorchAttentionBackend
from baton.server.kv_cache import allocate_kv_cache
from baton.server.loader import load_model
from baton.server.models.cpu_linear_plan import LinearPlan

BLOCK_SIZE = 16
NUM_BLOCKS = 8
SHAPES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "llama-gqa-llama3-rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
    ),
    "llama-tied-linear-rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_key_value_heads=4,
            rope_theta=100000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            tie_word_embeddings=True,
        ),
    ),
    "qwen2-qkv-bias": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_theta=1000000.0, tie_word_embeddings=False),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=None, tie_word_embeddings=False),
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(our model, the transformers model) with the same random weights."""
    return build_variant(request.param, tmp_path_factory)


def use_plan(model, text: str) -> None:
    plan = LinearPlan.parse(text)
    assert model.use_cpu_linear_plan(plan.ranges, keeps_dense="dense" in plan.forms)
    assert not model.use_cpu_linear_plan(plan.ranges, keeps_dense=False)  # once


@pytest.fixture(scope="module", params=list(VARIANTS))
def packed_variant(request, tmp_path_factory):
    """As `variant`, with our linears packed for MKL as the engine runs them on CPU."""
    model, hf = build_variant(request.param, tmp_path_factory)
    use_plan(model, "mkl-packed")
    return model, hf


# as the engine may run float32 CPU linears: each packed form, and two forms by row count
PLANS = ("none", "mkl-packed", "onednn-packed", "onednn@1,onednn-packed@3")


@pytest.fixture(scope="module", params=[(v, p) for p in PLANS for v in VARIANTS], ids=str)
def either(request, tmp_path_factory):
    """`variant` as is, and under each CPU linear plan, for the tests that compare logits."""
    name, plan = request.param
    model, hf = build_variant(name, tmp_path_factory)
    if plan != "none":
        use_plan(model, plan)
    return model, hf


def build_variant(name: str, tmp_path_factory):
    config_cls, model_cls, extra = VARIANTS[name]
    hf = model_cls(config_cls(**{**SHAPES, **extra})).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HF zeroes biases and sets norms to 1: perturb everything
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    ours = load_model(str(folder), dtype=torch.float32, device="cpu", show_progress=False)
    assert ours.tokenizer is None and ours.name == folder.name
    return ours.model, hf


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(
        0, SHAPES["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def run_schedule(model, seqs, tables, steps) -> list[torch.Tensor]:
    """Runs `steps` (each a list of (seq, num_new_tokens)) through one paged KV cache.

    Returns each sequence's logits for all its tokens, in order.
    """
    cfg = model.config
    cache = allocate_kv_cache(
        NUM_BLOCKS,
        cfg.num_hidden_layers,
        BLOCK_SIZE,
        cfg.num_key_value_heads,
        cfg.head_dim,
        torch.float32,
        "cpu",
    )
    cache.fill_(float("nan"))  # poison: only written slots may be read
    backend = TorchAttentionBackend()
    done = [0] * len(seqs)
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in steps:
        step = sorted(step, key=lambda s: s[1] != 1)  # decodes first
        ids, pos = [], []
        for i, n in step:
            ids += seqs[i][done[i] : done[i] + n]
            pos += range(done[i], done[i] + n)
        ends = [done[i] + n for i, n in step]
        meta = build_attention_metadata(
            [n for _, n in step], ends, [tables[i] for i, _ in step], BLOCK_SIZE, "cpu"
        )
        backend.prepare(meta)
        ctx = ForwardContext(backend=backend, meta=meta, kv_cache=cache)
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.tensor(pos), ctx)
            logits = model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), cfg.vocab_size)
        row = 0
        for (i, n), end in zip(step, ends, strict=True):
            out[i].append(logits[row : row + n])
            row += n
            done[i] = end
    return [torch.cat(o) for o in out]


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"max abs error {err}"


def test_single_prefill_matches_transformers(either):
    model, hf = either
    ids = prompt(40, seed=1)
    (ours,) = run_schedule(model, [ids], [[6, 1, 4]], [[(0, 40)]])
    assert_close(ours, hf_logits(hf, ids))


def test_chunked_prefill_and_decode_in_mixed_batches_match_transformers(either):
    model, hf = either
    a, b = prompt(40, seed=2), prompt(30, seed=3)
    tables = [[6, 1, 4], [7, 2]]
    steps = [[(0, 16), (1, 10)], [(1, 1), (0, 16)], [(0, 1), (1, 19)]]
    steps += [[(0, 1)]] * 7  # the rest of a, one token at a time
    ours = run_schedule(model, [a, b], tables, steps)
    assert_close(ours[0], hf_logits(hf, a))
    assert_close(ours[1], hf_logits(hf, b))


def test_tied_head_shares_the_embedding(variant):
    model, _ = variant
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    names = {n for n, _ in model.named_parameters()}
    assert ("lm_head.weight" in names) != tied
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (model.config.model_type == "qwen2")


def test_loaded_models_run_fused_projections_over_their_own_parameters(variant):
    model, _ = variant
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for fused, parts in (
            (attn.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (mlp.gate_up, (mlp.gate_proj, mlp.up_proj)),
        ):
            assert fused is not None
            storage = fused.weight.untyped_storage().data_ptr()
            assert all(p.weight.untyped_storage().data_ptr() == storage for p in parts)
            if parts[0].bias is not None:
                assert parts[2].bias.untyped_storage().data_ptr() == (
                    fused.bias.untyped_storage().data_ptr()
                )


def test_load_weights_checks_names_and_shapes():
    from baton.server.model_config import ModelConfig
    from baton.server.models.llama import LlamaForCausalLM

    cfg = ModelConfig.from_hf_dict({"model_type": "llama", **SHAPES, "tie_word_embeddings": True})
    model = LlamaForCausalLM(cfg)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    model.load_weights([*state.items(), ("model.rotary_emb.inv_freq", torch.ones(8))])
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])

    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="missing tensors model.norm.weight"):
        model.load_weights(missing.items())
    with pytest.raises(ValueError, match="unexpected tensors model.layers.0.mlp.bias"):
        model.load_weights([*state.items(), ("model.layers.0.mlp.bias", torch.ones(1))])
    bad = {**state, "model.layers.1.mlp.up_proj.weight": torch.ones(96, 63)}
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(96, 63\).*\(96, 64\)"):
        model.load_weights(bad.items())


def test_packing_frees_the_unpacked_weights_and_closes_loading(packed_variant):
    model, _ = packed_variant
    tied = model.config.tie_word_embeddings
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.down_proj, mlp.up_proj):
            assert m.weight.numel() == 0
        assert attn.qkv.weight is None and mlp.gate_up.weight is None
    # a tied head shares the embedding, which the lookup still reads
    assert (model.lm_head.weight.numel() == 0) != tied
    assert model.model.embed_tokens.weight.shape == (SHAPES["vocab_size"], SHAPES["hidden_size"])
    with pytest.raises(ValueError, match="set up for CPU inference"):
        model.load_weights([])


def test_a_plan_that_keeps_dense_weights_frees_nothing(tmp_path_factory):
    model, _ = build_variant("llama-gqa-llama3-rope", tmp_path_factory)
    use_plan(model, "dense@1,mkl-packed@4")
    assert model.model.layers[0].mlp.down_proj.weight.numel() > 0
    assert model.model.layers[0].self_attn.qkv.weight is not None


def test_only_float32_cpu_models_pack(tmp_path):
    from baton.server.model_config import ModelConfig
    from baton.server.models.llama import LlamaForCausalLM

    cfg = ModelConfig.from_hf_dict({"model_type": "llama", **SHAPES})
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.fuse_projections()
    assert not model.use_cpu_linear_plan(((1, "mkl-packed"),), keeps_dense=False)
    assert model.cpu_plan is None
    assert model.model.layers[0].self_attn.qkv.weight.numel() > 0
