"""FlexAttention for BEiT's biased attention (``pretrain.attention: flex``). It has no backward on
the CPU, so here: its forward against timm's SDPA, eager and compiled, the encoder it is swapped
into (same parameters, same checkpoints), the fallback to SDPA off a GPU, and the config's checks.
Its backward and speed are measured on a GPU (benchmarks/gpu_step.py, gpu_check.py)."""
import pytest
import torch
import torch.nn as nn

from conmim.config import ConfigError, canonical, canonical_hash, load_config
from conmim.method import attention
from conmim.method.attention import FlexBiasedAttention, use_flex_attention
from conmim.method.vit import MaskedViT
from conmim.train.build import build_encoder


def small_beit(*sets):
    return load_config("vit-b16-imagenet", ["data.root=/nonexistent", "model.img_size=32", "model.patch_size=8",
                                            "model.depth=2", *sets], check_paths=False)


def with_visible_bias(*encoders):
    """Zero-initialised bias tables (and q/v biases) filled, so that a bias dropped shows."""
    for enc in encoders:
        for name, p in enc.named_parameters():
            if name.endswith(("relative_position_bias_table", "q_bias", "v_bias")):
                nn.init.normal_(p, std=1.0)
    return encoders


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts the calls of FlexAttention through the encoder's attention."""
    calls = []
    real = attention.flex_biased_attention
    monkeypatch.setattr(attention, "flex_biased_attention", lambda *a: calls.append(1) or real(*a))
    return calls


def test_flex_attention_computes_beits_attention(monkeypatch, flex_calls):
    """A pre-training BEiT (one relative position bias shared by the blocks) and a fine-tuning one
    (a bias per block) give the same tokens with FlexAttention as with timm's SDPA, from the same
    state dict, which either loads."""
    torch.manual_seed(0)
    cfg = small_beit("pretrain.compile=true", "pretrain.attention=flex")
    flex = [build_encoder(cfg).eval(), build_encoder(cfg, for_finetune=True).eval()]
    assert sum(isinstance(m, FlexBiasedAttention) for m in flex[0].modules()) == 2
    assert not any(isinstance(m, FlexBiasedAttention) for m in flex[1].modules())  # (fine-tuning is not compiled)
    assert use_flex_attention(flex[1].vit) == 2
    sdpa = [build_encoder(small_beit()).eval(), build_encoder(small_beit(), for_finetune=True).eval()]
    with_visible_bias(*flex)
    for a, b in zip(sdpa, flex):
        assert a.state_dict().keys() == b.state_dict().keys()
        a.load_state_dict(b.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(sdpa, flex)) and not flex_calls  # (eager, CPU: SDPA)
        monkeypatch.setattr(FlexBiasedAttention, "use_flex", staticmethod(lambda x: True))
        for a, b in zip(sdpa, flex):
            ref, out = a(x), b(x)
            assert torch.allclose(ref, out, atol=1e-5), (ref - out).abs().max()
    assert len(flex_calls) == 4


@pytest.mark.slow
def test_compiled_flex_attention_takes_flexattention_in_one_graph(monkeypatch, flex_calls):
    """Compiled, the attention traces FlexAttention in one graph (no break back to Python) and
    computes timm's biased attention; off a GPU the compiled attention is SDPA's (FlexAttention has
    no backward on the CPU). Here 'a GPU' is what the test says it is."""
    torch.manual_seed(0)
    enc, = with_visible_bias(build_encoder(small_beit("pretrain.compile=true", "pretrain.attention=flex")).eval())
    blk = enc.vit.blocks[0].attn
    x, bias = torch.randn(2, 17, enc.embed_dim), enc.vit.rel_pos_bias()
    with torch.no_grad():
        ref = blk(x, shared_rel_pos_bias=bias)
        assert torch.allclose(torch.compile(blk, fullgraph=True)(x, shared_rel_pos_bias=bias), ref, atol=1e-6)
        assert not flex_calls
        monkeypatch.setattr(FlexBiasedAttention, "use_flex", staticmethod(lambda x: torch.compiler.is_compiling()))
        torch._dynamo.reset()
        out = torch.compile(blk, fullgraph=True)(x, shared_rel_pos_bias=bias)
    assert flex_calls and torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_flex_attention_is_checked_and_keeps_the_ids_of_sdpa():
    """``pretrain.attention`` came after ids were in use: at its default, 'sdpa', it is left out of
    the id (a sweep begun before resumes); 'flex' is another id. Without compilation or a BEiT
    relative position bias, 'flex' would change nothing: refused, naming the keys."""
    base = small_beit("pretrain.compile=true")
    flex = small_beit("pretrain.compile=true", "pretrain.attention=flex")
    assert canonical(base).pretrain.attention == "sdpa"
    assert canonical_hash(base) != canonical_hash(flex)
    d = canonical(base).to_dict()
    d.pop("resources")
    del d["pretrain"]["attention"]
    del d["data"]["cache_dir"]  # (where the images are cached: never in the id)
    assert d["eval"]["probe_train_per_class"] == 100  # (the preset's: a later knob away from its default stays in)
    import hashlib
    import json
    assert canonical_hash(base) == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
    for sets, named in ((["pretrain.compile=false"], "pretrain.compile"),
                        (["pretrain.compile=true", "model.shared_rel_pos_bias=false"], "model.shared_rel_pos_bias")):
        with pytest.raises(ConfigError) as e:
            small_beit("pretrain.attention=flex", *sets)
        assert "pretrain.attention=flex" in str(e.value) and named in str(e.value)
    with pytest.raises(ConfigError, match="model.name"):
        load_config("tiny", ["pretrain.compile=true", "pretrain.attention=flex"])
    with pytest.raises(ValueError, match="vit_tiny_patch16_224 has none"):  # (the encoder itself, built without a config)
        MaskedViT("vit_tiny_patch16_224", 32, 8, depth=1, attention="flex")
