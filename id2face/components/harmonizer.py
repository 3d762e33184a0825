"""Identity-Guided Latent Harmonizer: how each UNet cross-attention layer mixes identity and
attribute tokens, as diffusers attention processors (the UNet stays a stock UNet2DConditionModel).

Contract: ``install(unet, num_id_tokens)`` sets a processor on every attention layer; the context
the UNet gets is ``cat([id_tokens (N,K,C), attr_tokens (N,T,C)], 1)`` and cross-attention layers
split it at ``K``. ``attention_kwargs(timesteps (N,)) -> dict`` is what the caller passes to the
UNet as ``cross_attention_kwargs`` (the timestep embedding for the gates). Trainable parts (gate
MLPs) are submodules of the harmonizer, not of the UNet: processors only hold references.

- ``concat`` (null): one stock cross-attention over all K + T tokens.
- ``sum``: separate attention to identity and attribute tokens, ``0.5 * (attn_id + attn_attr)``.
- ``gated``: ``g * attn_id + (1 - g) * attn_attr``, ``g = sigmoid(MLP(h + W t_emb))`` per query
  position, from the layer's hidden state ``h`` and the timestep.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import active_autocast_dtype
from ..registry import HARMONIZERS

TIMESTEP_KWARG = "harmonizer_temb"


def _attention_module(unet: nn.Module, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def _is_cross_attention(processor_name: str, attn: nn.Module) -> bool:
    return bool(getattr(attn, "is_cross_attention", False)) or processor_name.endswith("attn2.processor")


class SelfAttnProcessor:
    """Stock scaled-dot-product attention that accepts (and ignores) the harmonizer's timestep.

    diffusers hands every ``cross_attention_kwargs`` entry to self-attention too and warns about
    each one its processor does not name; this one names it.
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._stock = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 harmonizer_temb=None):
        return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


ATTENTION_PATHS = ("weights", "sdpa")


class DecoupledCrossAttnProcessor:
    """Cross-attention to identity tokens (first ``num_id_tokens``) and attribute tokens separately,
    mixed per query position by a gate (``None``: fixed 0.5). Follows diffusers' AttnProcessor2_0;
    the two branches share the layer's key/value projections.

    ``g * softmax(s_id) v_id + (1 - g) * softmax(s_attr) v_attr``, computed one of two ways (same
    values; which is faster is the device's call, ``benchmarks/harmonizer_attention.py``):

    - ``weights``: one attention with the gate folded into its weights, ``[g p_id, (1 - g) p_attr] v``:
      one score and one value matmul over all tokens, the mixing on the (heads x tokens) weights
      rather than on two full-width outputs. Fewer bytes kept for backward (CPU: faster).
    - ``sdpa``: two fused attention kernels (``F.scaled_dot_product_attention``, flash on a GPU)
      and one ``lerp`` of their outputs: fewer, fused kernels (on the GPU a step of ours launches
      1.6x the bare UNet's kernels; ``train_step.py --traffic``).
    """

    def __init__(self, num_id_tokens: int, gate: nn.Module | None = None, attention: str = "weights"):
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {attention!r}")
        self.num_id_tokens = num_id_tokens
        self.gate = gate  # owned (and registered) by the harmonizer, referenced here
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 harmonizer_temb=None):
        if encoder_hidden_states is None:
            raise ValueError("the harmonizer's processor is for cross-attention layers only")
        k_id = self.num_id_tokens
        if not 0 < k_id < encoder_hidden_states.shape[1]:
            raise ValueError(f"context of {encoder_hidden_states.shape[1]} tokens cannot hold "
                             f"{k_id} identity tokens and at least one attribute token")
        if self.gate is not None and harmonizer_temb is None:
            raise ValueError(f"the gated harmonizer needs cross_attention_kwargs['{TIMESTEP_KWARG}']")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, context_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        autocast_dtype = active_autocast_dtype(hidden_states.device.type)
        if self.gate is not None and autocast_dtype is not None:
            # Cast once for both readers (to_q and the gate): autocast would cast it for each, and
            # cast both gradients back.
            hidden_states = hidden_states.to(autocast_dtype)
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (B, 1, Q, 1): one gate value per query position, for all heads
        g = None if self.gate is None else self.gate(hidden_states, harmonizer_temb).unsqueeze(1)
        mix = self._mix_sdpa if self.attention == "sdpa" else self._mix_weights
        mixed = mix(query, key, value, attention_mask, g)
        mixed = mixed.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](mixed))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _mix_weights(self, query, key, value, attention_mask, g):
        k_id = self.num_id_tokens
        # SDPA's default scale (what AttnProcessor2_0 uses), not attn.scale.
        scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5  # (B, heads, Q, K + T)
        if attention_mask is not None:
            scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                      else scores + attention_mask)
        # Softmax in fp32 (as SDPA's kernels accumulate), each segment over its own tokens.
        p_id = scores[..., :k_id].softmax(-1, dtype=torch.float32)
        p_attr = scores[..., k_id:].softmax(-1, dtype=torch.float32)
        if g is None:
            weights = 0.5 * torch.cat([p_id, p_attr], dim=-1)
        else:
            g = g.float()
            weights = torch.cat([g * p_id, (1 - g) * p_attr], dim=-1)
        return weights.to(value.dtype) @ value

    def _mix_sdpa(self, query, key, value, attention_mask, g):
        k_id = self.num_id_tokens
        masks = (None, None) if attention_mask is None else (attention_mask[..., :k_id], attention_mask[..., k_id:])
        o_id = F.scaled_dot_product_attention(query, key[:, :, :k_id], value[:, :, :k_id], attn_mask=masks[0])
        o_attr = F.scaled_dot_product_attention(query, key[:, :, k_id:], value[:, :, k_id:], attn_mask=masks[1])
        return torch.lerp(o_attr, o_id, 0.5 if g is None else g.to(o_id.dtype))


class TimestepGate(nn.Module):
    """``g = sigmoid(MLP(h + W t_emb))``: (N,Q,width) hidden + (N,E) timestep embedding -> (N,Q,1).

    The last layer starts at zero (g = 0.5 everywhere: training starts from ``sum``).
    """

    def __init__(self, width: int, time_embed_dim: int, hidden: int):
        super().__init__()
        self.time_proj = nn.Linear(time_embed_dim, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        first, activation, last = self.mlp
        # first(h + W t) = first(h) + first.weight @ W t: the timestep term is one (N, hidden) row
        # per sample, so no (N, Q, width) sum is built (or kept for backward) at every position.
        time_term = F.linear(self.time_proj(temb.to(hidden.dtype)), first.weight)
        return torch.sigmoid(last(activation(first(hidden) + time_term[:, None, :])))


class Harmonizer(nn.Module):
    """Base: installs one processor per attention layer of a diffusers UNet."""

    num_id_tokens: int | None = None

    def __init__(self):  # explicit: the registry passes only the keyword arguments named here
        super().__init__()

    def install(self, unet: nn.Module, num_id_tokens: int) -> None:
        self.num_id_tokens = num_id_tokens
        processors = {}
        for name in unet.attn_processors:
            attn = _attention_module(unet, name)
            processors[name] = (self.cross_attention_processor(name, attn, num_id_tokens)
                                if _is_cross_attention(name, attn) else self.self_attention_processor())
        unet.set_attn_processor(processors)

    def self_attention_processor(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()

    def cross_attention_processor(self, name: str, attn: nn.Module, num_id_tokens: int):
        raise NotImplementedError

    def attention_kwargs(self, timesteps: torch.Tensor) -> dict:
        """The UNet's ``cross_attention_kwargs`` for a forward pass at ``timesteps`` (N,)."""
        return {}


@HARMONIZERS.register("concat")
class ConcatHarmonizer(Harmonizer):
    """Null: plain cross-attention over the concatenated identity and attribute tokens."""

    def cross_attention_processor(self, name, attn, num_id_tokens):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()


@HARMONIZERS.register("sum")
class SumHarmonizer(Harmonizer):
    """Decoupled attention with a fixed gate: ``0.5 * (attn_id + attn_attr)``. ``attention``: how
    it is computed (``DecoupledCrossAttnProcessor``; a speed switch, same values)."""

    def __init__(self, attention: str = "weights"):
        super().__init__()
        self.attention = attention

    def cross_attention_processor(self, name, attn, num_id_tokens):
        return DecoupledCrossAttnProcessor(num_id_tokens, gate=None, attention=self.attention)


@HARMONIZERS.register("gated")
class GatedHarmonizer(Harmonizer):
    """Decoupled attention with a learned spatial, timestep-aware gate per cross-attention layer;
    ``attention`` as in ``SumHarmonizer``."""

    def __init__(self, gate_hidden: int = 64, time_embed_dim: int = 64, attention: str = "weights"):
        super().__init__()
        self.gate_hidden = gate_hidden
        self.time_embed_dim = time_embed_dim
        self.attention = attention
        self.gates = nn.ModuleDict()

    def install(self, unet: nn.Module, num_id_tokens: int) -> None:
        self.gates = nn.ModuleDict()
        super().install(unet, num_id_tokens)

    def self_attention_processor(self):
        return SelfAttnProcessor()

    def cross_attention_processor(self, name, attn, num_id_tokens):
        key = name.removesuffix(".processor").replace(".", "_")
        self.gates[key] = TimestepGate(attn.to_q.in_features, self.time_embed_dim, self.gate_hidden)
        return DecoupledCrossAttnProcessor(num_id_tokens, gate=self.gates[key], attention=self.attention)

    def attention_kwargs(self, timesteps: torch.Tensor) -> dict:
        from diffusers.models.embeddings import get_timestep_embedding

        temb = get_timestep_embedding(timesteps.reshape(-1), self.time_embed_dim, flip_sin_to_cos=True,
                                      downscale_freq_shift=0)
        return {TIMESTEP_KWARG: temb}
