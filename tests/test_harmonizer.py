"""Harmonizer contract: every registered variant installs into a stock UNet and honours its formula."""
import logging

import pytest
import torch
from torch import nn

from id2face.components.harmonizer import ATTENTION_PATHS, TIMESTEP_KWARG, DecoupledCrossAttnProcessor, TimestepGate
from id2face.registry import BACKBONES, HARMONIZERS

CONTEXT_DIM, NUM_ID_TOKENS, NUM_ATTR_TOKENS = 32, 3, 5
TINY_UNET = dict(sample_size=16, block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, attention_head_dim=8)



def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    return BACKBONES.build({"name": "unet", "params": TINY_UNET}, in_channels=7, out_channels=3,
                           cross_attention_dim=CONTEXT_DIM)


def unet_inputs(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 7, 16, 16, generator=g)
    context = torch.randn(n, NUM_ID_TOKENS + NUM_ATTR_TOKENS, CONTEXT_DIM, generator=g)
    return x, torch.tensor([10, 700])[:n], context


def cross_attention_names(unet):
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def perturb_gates(harmonizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in harmonizer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def attention_layer():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=48, cross_attention_dim=CONTEXT_DIM, heads=4, dim_head=12).eval()


@pytest.mark.parametrize("name", HARMONIZERS.names())
def test_every_harmonizer_installs_and_keeps_shapes_without_kwarg_warnings(name, caplog):
    backbone = tiny_backbone()
    harmonizer = HARMONIZERS.build({"name": name, "params": {}}, context_dim=CONTEXT_DIM)
    harmonizer.install(backbone.unet, NUM_ID_TOKENS)
    assert harmonizer.num_id_tokens == NUM_ID_TOKENS
    assert len(cross_attention_names(backbone.unet)) == 4  # 1 down + 2 up (layers_per_block + 1) + mid
    x, t, context = unet_inputs()
    with caplog.at_level(logging.WARNING):
        out = backbone(x, t, context, harmonizer.attention_kwargs(t))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    # Trainable parts belong to the harmonizer only: nothing new is registered inside the UNet.
    assert {id(p) for p in harmonizer.parameters()}.isdisjoint({id(p) for p in backbone.unet.parameters()})
    assert sum(p.numel() for p in backbone.unet.parameters()) == sum(p.numel() for p in tiny_backbone().unet.parameters())


def test_concat_equals_stock_attention():
    stock, installed = tiny_backbone(), tiny_backbone()
    harmonizer = HARMONIZERS.build({"name": "concat", "params": {}})
    harmonizer.install(installed.unet, NUM_ID_TOKENS)
    x, t, context = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(installed(x, t, context, harmonizer.attention_kwargs(t)), stock(x, t, context))


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
def test_sum_is_the_average_of_the_two_single_branch_attentions(attention_layer, attention):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = attention_layer
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 20, 48, generator=g)
    context = torch.randn(2, NUM_ID_TOKENS + NUM_ATTR_TOKENS, CONTEXT_DIM, generator=g)
    stock = AttnProcessor2_0()
    with torch.no_grad():
        attn_id = stock(attn, hidden, context[:, :NUM_ID_TOKENS])
        attn_attr = stock(attn, hidden, context[:, NUM_ID_TOKENS:])
        mixed = DecoupledCrossAttnProcessor(NUM_ID_TOKENS, attention=attention)(attn, hidden, context)
        full = stock(attn, hidden, context)
    torch.testing.assert_close(mixed, 0.5 * (attn_id + attn_attr), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed, full, atol=1e-3)  # decoupled != one softmax over all tokens


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_decoupled_attention_honours_an_attention_mask_per_segment(attention_layer, mask_kind, attention):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn, stock = attention_layer, AttnProcessor2_0()
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 20, 48, generator=g)
    tokens = NUM_ID_TOKENS + NUM_ATTR_TOKENS
    context = torch.randn(2, tokens, CONTEXT_DIM, generator=g)
    keep = torch.ones(2, 1, tokens, dtype=torch.bool)
    keep[0, 0, NUM_ID_TOKENS + 1] = keep[1, 0, 1] = keep[1, 0, -1] = False  # one token of each segment
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e4)
    with torch.no_grad():
        attn_id = stock(attn, hidden, context[:, :NUM_ID_TOKENS], attention_mask=mask[..., :NUM_ID_TOKENS])
        attn_attr = stock(attn, hidden, context[:, NUM_ID_TOKENS:], attention_mask=mask[..., NUM_ID_TOKENS:])
        processor = DecoupledCrossAttnProcessor(NUM_ID_TOKENS, attention=attention)
        mixed = processor(attn, hidden, context, attention_mask=mask)
        unmasked = processor(attn, hidden, context)
    torch.testing.assert_close(mixed, 0.5 * (attn_id + attn_attr), atol=1e-5, rtol=1e-5)
    assert (mixed - unmasked).abs().max() > 1e-3


def test_sum_harmonizer_installs_decoupled_processors_everywhere():
    backbone = tiny_backbone()
    HARMONIZERS.build({"name": "sum", "params": {}}).install(backbone.unet, NUM_ID_TOKENS)
    processors = backbone.unet.attn_processors
    assert all(isinstance(processors[n], DecoupledCrossAttnProcessor) for n in cross_attention_names(backbone.unet))
    assert not any(isinstance(p, DecoupledCrossAttnProcessor) for n, p in processors.items() if "attn1" in n)


def test_gated_gate_is_in_unit_interval_and_depends_on_timestep_and_position():
    harmonizer = HARMONIZERS.build({"name": "gated", "params": {"gate_hidden": 16, "time_embed_dim": 32}})
    backbone = tiny_backbone()
    harmonizer.install(backbone.unet, NUM_ID_TOKENS)
    assert len(harmonizer.gates) == 4
    perturb_gates(harmonizer)
    gate = next(iter(harmonizer.gates.values()))
    width = gate.time_proj.out_features
    hidden = torch.randn(1, 10, width, generator=torch.Generator().manual_seed(2)).expand(2, -1, -1)
    temb = harmonizer.attention_kwargs(torch.tensor([5, 900]))[TIMESTEP_KWARG]
    assert temb.shape == (2, 32)
    with torch.no_grad():
        g = gate(hidden, temb)
    assert g.shape == (2, 10, 1)
    assert ((g > 0) & (g < 1)).all()
    assert (g[0] - g[1]).abs().max() > 1e-3  # same hidden state, other timestep -> other gate
    assert g[0].std() > 1e-3  # per query position
    with torch.no_grad():  # the formula as written: sigmoid(MLP(h + W t_emb))
        torch.testing.assert_close(g, torch.sigmoid(gate.mlp(hidden + gate.time_proj(temb)[:, None, :])))


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
def test_gated_mixes_with_its_gate_and_starts_as_sum(attention_layer, attention):
    attn = attention_layer
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 20, 48, generator=g)
    context = torch.randn(2, NUM_ID_TOKENS + NUM_ATTR_TOKENS, CONTEXT_DIM, generator=g)
    temb = torch.randn(2, 16, generator=g)
    gate = TimestepGate(48, 16, 8)
    gated = DecoupledCrossAttnProcessor(NUM_ID_TOKENS, gate=gate, attention=attention)
    sum_ = DecoupledCrossAttnProcessor(NUM_ID_TOKENS, attention=attention)
    with torch.no_grad():
        torch.testing.assert_close(gated(attn, hidden, context, harmonizer_temb=temb), sum_(attn, hidden, context))
        nn.init.normal_(gate.mlp[-1].weight, std=1.0)
        # g -> 1 gives pure identity attention: check the mixing weights themselves.
        gate.mlp[-1].bias.fill_(30.0)
        only_id = gated(attn, hidden, context, harmonizer_temb=temb)
        gate.mlp[-1].bias.fill_(-30.0)
        only_attr = gated(attn, hidden, context, harmonizer_temb=temb)
    from diffusers.models.attention_processor import AttnProcessor2_0

    with torch.no_grad():
        torch.testing.assert_close(only_id, AttnProcessor2_0()(attn, hidden, context[:, :NUM_ID_TOKENS]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(only_attr, AttnProcessor2_0()(attn, hidden, context[:, NUM_ID_TOKENS:]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=TIMESTEP_KWARG):
        gated(attn, hidden, context)


def test_gated_unet_output_depends_on_gates_and_gradients_reach_them():
    backbone = tiny_backbone()
    harmonizer = HARMONIZERS.build({"name": "gated", "params": {"gate_hidden": 8, "time_embed_dim": 16}})
    harmonizer.install(backbone.unet, NUM_ID_TOKENS)
    x, t, context = unet_inputs()
    out = backbone(x, t, context, harmonizer.attention_kwargs(t))
    out.square().mean().backward()
    last_layers = [gate.mlp[-1].weight for gate in harmonizer.gates.values()]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in last_layers)
    perturb_gates(harmonizer)
    with torch.no_grad():
        assert (backbone(x, t, context, harmonizer.attention_kwargs(t)) - out).abs().max() > 1e-4


def test_gated_works_under_gradient_checkpointing():
    torch.manual_seed(0)
    backbone = BACKBONES.build({"name": "unet", "params": {**TINY_UNET, "gradient_checkpointing": True}},
                               in_channels=7, out_channels=3, cross_attention_dim=CONTEXT_DIM)
    assert backbone.unet.is_gradient_checkpointing
    harmonizer = HARMONIZERS.build({"name": "gated", "params": {"gate_hidden": 8, "time_embed_dim": 16}})
    harmonizer.install(backbone.unet, NUM_ID_TOKENS)
    perturb_gates(harmonizer)
    backbone.train()
    x, t, context = unet_inputs()
    backbone(x, t, context, harmonizer.attention_kwargs(t)).square().mean().backward()
    assert all(p.grad is not None for p in harmonizer.parameters())


@pytest.mark.parametrize("name", ["sum", "gated"])
def test_decoupled_variants_reject_a_context_without_attribute_tokens(name):
    backbone = tiny_backbone()
    harmonizer = HARMONIZERS.build({"name": name, "params": {}})
    harmonizer.install(backbone.unet, NUM_ID_TOKENS)
    x, t, _ = unet_inputs()
    with pytest.raises(ValueError, match="identity tokens"):
        backbone(x, t, torch.randn(2, NUM_ID_TOKENS, CONTEXT_DIM), harmonizer.attention_kwargs(t))


def test_unknown_harmonizer_lists_the_valid_names():
    from id2face.registry import RegistryError

    with pytest.raises(RegistryError, match="valid names: concat, gated, sum"):
        HARMONIZERS.build({"name": "nope", "params": {}})


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_two_attention_paths_give_the_same_outputs_and_gradients(attention_layer, autocast):
    """``attention: sdpa`` is a speed switch: same values and gradients as the default path."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 20, 48, generator=g)
    context = torch.randn(2, NUM_ID_TOKENS + NUM_ATTR_TOKENS, CONTEXT_DIM, generator=g)
    temb = torch.randn(2, 16, generator=g)
    torch.manual_seed(0)
    gate = TimestepGate(48, 16, 8)
    nn.init.normal_(gate.mlp[-1].weight, std=1.0)  # a trained gate: not 0.5 everywhere
    results = {}
    for attention in ATTENTION_PATHS:
        inputs = [hidden.clone().requires_grad_(), context.clone().requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = DecoupledCrossAttnProcessor(NUM_ID_TOKENS, gate, attention)(attention_layer, *inputs,
                                                                             harmonizer_temb=temb)
        params = [*attention_layer.parameters(), *gate.parameters()]
        grads = torch.autograd.grad(out.float().square().sum(), [*inputs, *params])
        results[attention] = (out.float(), grads)
    tolerance = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results["sdpa"][0], results["weights"][0], **tolerance)
    for got, expected in zip(results["sdpa"][1], results["weights"][1]):
        torch.testing.assert_close(got, expected, **tolerance)


def test_an_unknown_attention_path_is_refused():
    with pytest.raises(ValueError, match="attention must be one of weights, sdpa"):
        HARMONIZERS.build({"name": "gated", "params": {"attention": "flash"}}).install(tiny_backbone().unet, 2)


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
def test_the_gated_unet_compiles_as_one_graph_where_dynamo_cannot_trace_autocast_queries(attention, monkeypatch,
                                                                                           fresh_dynamo):
    """Dynamo of torch 2.11 cannot trace ``torch.amp.is_autocast_available``: a harmonizer (or a
    low-precision norm) asking it broke the compiled UNet's graph in every cross-attention layer,
    and on an H100 the SD-1.5 UNet's blocks were recompiled one by one until dynamo gave up.
    Emulated here by hiding the function from dynamo."""
    monkeypatch.setattr(torch.amp, "is_autocast_available", torch._dynamo.disable(torch.amp.is_autocast_available))
    torch.manual_seed(0)
    backbone = BACKBONES.build({"name": "unet", "params": {**TINY_UNET, "low_precision_norms": True}},
                               in_channels=7, out_channels=3, cross_attention_dim=CONTEXT_DIM).eval()
    harmonizer = HARMONIZERS.build({"name": "gated", "params": {"gate_hidden": 8, "time_embed_dim": 16,
                                                                "attention": attention}})
    harmonizer.install(backbone.unet, NUM_ID_TOKENS)
    x, t, context = unet_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(backbone.unet)(x, t, encoder_hidden_states=context,
                                                           cross_attention_kwargs=harmonizer.attention_kwargs(t))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
