"""Connectors: encoder frames (B, T, D_enc) -> a prefix of decoder embeddings (B, P, D_dec).

- `linear` (SLAM-AAC): stack k consecutive frames (downsampling by k), then a linear projector,
  or a two-layer MLP when `hidden` is set. SLAM-AAC uses k = 5.
- `qformer` (SALMONN): transformers' Blip2QFormerModel over fixed windows of `window` frames;
  `queries` learned query tokens per window cross-attend to the window's frames, then a linear
  map into the decoder's space. One window-level Q-Former, as SALMONN's.
"""

from __future__ import annotations

from typing import Literal, Optional

import pydantic


class ConnectorSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    type: Literal["linear", "qformer"] = "linear"
    k: int = pydantic.Field(5, ge=1)  # linear: frames stacked per prefix token
    hidden: Optional[int] = pydantic.Field(None, ge=1)  # linear: MLP width (None: one linear layer)
    window: int = pydantic.Field(17, ge=1)  # qformer: frames per window
    queries: int = pydantic.Field(1, ge=1)  # qformer: prefix tokens per window
    qformer_hidden: int = pydantic.Field(256, ge=8)
    qformer_layers: int = pydantic.Field(2, ge=1)
    qformer_heads: int = pydantic.Field(4, ge=1)


def _pad_to_multiple(x, n: int):
    import torch

    t = x.shape[1]
    extra = (-t) % n
    if extra:
        x = torch.cat([x, x.new_zeros(x.shape[0], extra, x.shape[2])], dim=1)
    return x


def build_connector(spec: ConnectorSpec, in_dim: int, out_dim: int):
    import torch
    from torch import nn

    class LinearConnector(nn.Module):
        def __init__(self):
            super().__init__()
            d = in_dim * spec.k
            self.proj = nn.Linear(d, out_dim) if spec.hidden is None else nn.Sequential(
                nn.Linear(d, spec.hidden), nn.GELU(), nn.Linear(spec.hidden, out_dim))

        def forward(self, frames):
            x = _pad_to_multiple(frames, spec.k)
            b, t, d = x.shape
            return self.proj(x.reshape(b, t // spec.k, d * spec.k))

    class QFormerConnector(nn.Module):
        def __init__(self):
            super().__init__()
            from transformers import Blip2QFormerConfig, Blip2QFormerModel

            cfg = Blip2QFormerConfig(hidden_size=spec.qformer_hidden, num_hidden_layers=spec.qformer_layers,
                                     num_attention_heads=spec.qformer_heads, intermediate_size=4 * spec.qformer_hidden,
                                     encoder_hidden_size=in_dim, cross_attention_frequency=1)
            self.qformer = Blip2QFormerModel(cfg)
            self.query = nn.Parameter(torch.randn(1, spec.queries, spec.qformer_hidden) * 0.02)
            self.proj = nn.Linear(spec.qformer_hidden, out_dim)

        def forward(self, frames):
            real = frames.shape[1]
            x = _pad_to_multiple(frames, spec.window)
            b, t, d = x.shape
            n = t // spec.window
            windows = x.reshape(b * n, spec.window, d)
            # The last window's padding frames are not attended to (every window keeps a real frame).
            mask = (torch.arange(t, device=x.device) < real).long().expand(b, t).reshape(b * n, spec.window)
            q = self.qformer(query_embeds=self.query.expand(b * n, -1, -1).to(x.dtype), encoder_hidden_states=windows,
                             encoder_attention_mask=mask)
            return self.proj(q.last_hidden_state).reshape(b, n * spec.queries, -1)

    return LinearConnector() if spec.type == "linear" else QFormerConnector()


def prefix_length(spec: ConnectorSpec, n_frames: int) -> int:
    """How many prefix tokens `n_frames` encoder frames become."""
    if spec.type == "linear":
        return -(-n_frames // spec.k)
    return -(-n_frames // spec.window) * spec.queries
