"""Symmetric InfoNCE over a batch of (audio, caption) pairs, with CLAP's two learnable temperatures.

transformers' `ClapModel.forward(return_loss=True)` is NOT symmetric: it averages
CE(logits_per_text) with CE(logits_per_audio.t()), and logits_per_audio.t() has text rows again
(text->audio twice, with the two scales). We use logits_per_audio's own rows for the audio->text
half; the text->audio half equals transformers' `caption_loss`.
"""

from __future__ import annotations


def clap_logits(text_embeds, audio_embeds, logit_scale_t, logit_scale_a):
    """L2-normalized (B, D) embeddings -> (logits_per_text, logits_per_audio), like ClapModel.forward."""
    logits_per_text = text_embeds @ audio_embeds.t() * logit_scale_t.exp()
    logits_per_audio = audio_embeds @ text_embeds.t() * logit_scale_a.exp()
    return logits_per_text, logits_per_audio


def symmetric_infonce(logits_per_text, logits_per_audio):
    """Mean of text->audio and audio->text cross-entropy; pair i is row i / column i."""
    import torch
    import torch.nn.functional as F

    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_audio, labels)) / 2.0


def multi_positive_infonce(logits_per_text, logits_per_audio, positives):
    """Symmetric InfoNCE with soft targets: `positives[i, j]` (bool, diagonal set) marks caption i as
    describing audio j. Each row's target spreads evenly over its positives; with only the diagonal
    set this equals `symmetric_infonce`."""
    import torch.nn.functional as F

    pos = positives.float()
    t2a = pos / pos.sum(1, keepdim=True)
    a2t = pos.t() / pos.t().sum(1, keepdim=True)
    return (F.cross_entropy(logits_per_text, t2a) + F.cross_entropy(logits_per_audio, a2t)) / 2.0


def shared_caption_positives(texts: list[str], captions: list[list[str]]):
    """(B, B) bool: caption i is one of audio j's captions (i == j always)."""
    import torch

    sets = [set(c) for c in captions]
    pos = torch.tensor([[t in s for s in sets] for t in texts], dtype=torch.bool)
    return pos | torch.eye(len(texts), dtype=torch.bool)


def clap_outputs_loss(out, positives=None):
    """The loss from a ClapModel forward output (its logits carry the learnable scales)."""
    if positives is not None and bool(positives.sum() > positives.shape[0]):
        return multi_positive_infonce(out.logits_per_text, out.logits_per_audio, positives.to(out.logits_per_text.device))
    return symmetric_infonce(out.logits_per_text, out.logits_per_audio)
