"""`QuantAttnProcessor`: a diffusers attention processor that quantizes the attention matmul inputs.

It computes attention explicitly (baddbmm + softmax, as diffusers' `AttnProcessor`) so that q, k, v and the
post-softmax probabilities can each pass through their own `TemporalQuantizer`. The projections `to_q`, `to_k`,
`to_v`, `to_out[0]` are ordinary (quantized) linear layers of the `Attention` module and are swapped separately.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from dq.quant.quantizer import StepContext, TemporalQuantizer
from dq.quant.spec import QuantizerSpec

__all__ = ["QuantAttnProcessor"]


class QuantAttnProcessor(nn.Module):
    """Attention processor with fake-quantized q, k, v (act bits) and probabilities (`attn_prob_bits`).

    q, k and v are quantized as [B, L, C] before the head split, and the probabilities as
    [B, heads, Lq, Lk], so the leading dim is always the sample and each sample uses its own step's (Δ, z).
    Handles spatial_norm, group_norm, norm_cross, norm_q / norm_k, attention_mask, residual_connection,
    rescale_output_factor, cross attention and 3D or 4D inputs like diffusers' `AttnProcessor`.

    Args:
        act_spec: Spec of the q, k and v quantizers.
        prob_spec: Spec of the probability quantizer.
        ctx: Shared step context of the model (a private one when None).
    """

    def __init__(self, act_spec: QuantizerSpec, prob_spec: QuantizerSpec, ctx: StepContext | None = None) -> None:
        super().__init__()
        ctx = ctx if ctx is not None else StepContext()
        self.q_quantizer = TemporalQuantizer(act_spec, ctx)
        self.k_quantizer = TemporalQuantizer(act_spec, ctx)
        self.v_quantizer = TemporalQuantizer(act_spec, ctx)
        self.prob_quantizer = TemporalQuantizer(prob_spec, ctx)

    @staticmethod
    def _head_norm(x: Tensor, norm: nn.Module | None, heads: int) -> Tensor:
        if norm is None:
            return x
        b, n, c = x.shape
        return norm(x.view(b, n, heads, c // heads)).reshape(b, n, c)  # norm over each head's features

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        # explicit signature: `Attention.forward` inspects it to decide which kwargs (e.g. temb) to pass on
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = self._head_norm(query, getattr(attn, "norm_q", None), attn.heads)
        key = self._head_norm(key, getattr(attn, "norm_k", None), attn.heads)

        # [B, L, C] quantized before the head split: dim 0 is the sample. When sampling, each quantizer overwrites
        # its input, a new tensor of this forward (`key` and `value` are distinct outputs of to_k and to_v).
        inplace = not torch.is_grad_enabled()
        query = attn.head_to_batch_dim(self.q_quantizer(query, inplace=inplace))
        key = attn.head_to_batch_dim(self.k_quantizer(key, inplace=inplace))
        value = attn.head_to_batch_dim(self.v_quantizer(value, inplace=inplace))

        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, Lq, Lk]
        bh, lq, lk = probs.shape
        probs = self.prob_quantizer(probs.view(bh // attn.heads, attn.heads, lq, lk), inplace=inplace).view(bh, lq, lk)

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
