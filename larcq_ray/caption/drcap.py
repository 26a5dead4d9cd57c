"""The drcap captioner (DRCap, seed 002): trained on text alone, it captions audio through CLAP's
shared audio-text space.

    window -> CLAP audio embedding a -> projection onto the caption support S:
              e = softmax(a S^T / tau) S  -> projector -> prefix of `prefix_tokens` embeddings
    decoder input:  [top-3 similar datastore captions, joined by ". "] [prefix] [prompt] -> caption

S holds the CLAP text embeddings of the datastore's captions (L2-normalized). tau is the trained
CLAP's own audio-to-text temperature: 1 / exp(logit_scale_a), the scale ClapModel puts on
`logits_per_audio = a @ t^T` (logit_scale_t scales the text-to-audio direction).

Training needs only captions: the CLAP text embedding of the target caption stands in for the audio
embedding and goes through the same projection, with the caption itself left out of the support and
of its retrieved captions (else the projection returns the caption's own embedding and the decoder
learns to copy). Training-time retrieval samples captions whose similarity lies in the band
(0.75, 0.85) when there are any, else takes the most similar ones; at test time it is the top 3
(audio to text). CLAP stays frozen; the projector trains, and the decoder as `decoder.train` says.

A captioner is a folder that `larcq-ray train-captioner` writes and the caption job loads:

    captioner.json          DrcapConfig: CLAP, decoder, prefix_tokens, prompt (+ what trained it)
    projector.safetensors   the projector's weights
    datastore.parquet       caption, embedding (the support and the retrieval store)
    decoder_adapter/        the decoder's LoRA adapter (decoder.train: lora)
    decoder/                the whole decoder and its tokenizer (decoder.train: full)

`clap.name_or_path`, `clap.adapter` and `decoder.name_or_path` are hub ids or folders; a relative
path is read relative to the captioner folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pydantic

from larcq_ray.caption.config import BackendSpec, CaptionBackendConfig
from larcq_ray.caption.prefix_decoder import DEFAULT_PROMPT, DecoderSpec
from larcq_ray.core.errors import LarcqError

CONFIG_FILE = "captioner.json"
PROJECTOR_FILE = "projector.safetensors"
DATASTORE_FILE = "datastore.parquet"
_EMBED_BATCH = 256  # captions per CLAP text forward when building a datastore


class ClapSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    name_or_path: str  # a CLAP: hub id or folder (ours from train-clap too)
    adapter: Optional[str] = None  # a peft LoRA adapter merged into it


class DrcapConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["drcap"] = "drcap"
    clap: ClapSpec
    decoder: DecoderSpec
    prefix_tokens: int = pydantic.Field(1, ge=1)  # DRCap maps the one CLAP vector to one LLM token
    projector: Literal["linear", "mlp"] = "linear"  # mlp: Linear -> GELU -> Linear
    projector_hidden: Optional[int] = pydantic.Field(None, ge=1)  # mlp width (None: the decoder's)
    prompt: str = DEFAULT_PROMPT
    top_k: int = pydantic.Field(3, ge=0)  # retrieved captions put before the prefix (0: no retrieval)
    retrieval_band: tuple[float, float] = (0.75, 0.85)  # training: sample captions this similar
    trained: Optional[dict] = None  # what train-captioner recorded (steps, data, validation figures)

    @pydantic.field_validator("retrieval_band")
    @classmethod
    def _band(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not -1.0 <= v[0] < v[1] <= 1.0:
            raise ValueError("retrieval_band must be (low, high) with -1 <= low < high <= 1")
        return v


def read_config(folder: str | Path) -> DrcapConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise LarcqError(f"{folder} is not a drcap captioner folder (no {CONFIG_FILE}); "
                         "train one with `larcq-ray train-captioner`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LarcqError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and data.get("kind", "drcap") != "drcap":
        raise LarcqError(f"{folder} holds a {data.get('kind')!r} captioner, not a drcap one; "
                         f"set caption.backend.kind: {data.get('kind')}")
    try:
        return DrcapConfig.model_validate(data)
    except pydantic.ValidationError as e:
        raise LarcqError(f"{path} is not a valid drcap config: {str(e).splitlines()[0][:300]}") from None


def _resolve(name: Optional[str], folder: Optional[Path]) -> Optional[str]:
    if name and folder is not None and not Path(name).is_absolute() and (folder / name).exists():
        return str((folder / name).resolve())
    return name


def _same_caption_key(text: str) -> str:
    """Captions that differ only in case, spacing or a final period are the same caption."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(". ")


def join_retrieved(captions: list[str]) -> str:
    """DRCap's retrieval text: the similar captions joined by '. ' (no doubled periods)."""
    return ". ".join(c.strip().rstrip(".").strip() for c in captions if c.strip())


# -- the math, on plain tensors (what the tests check) ----------------------------------------

def project_onto_support(query, support, tau: float, exclude=None):
    """e = softmax(query @ support^T / tau) @ support, per row.

    query (B, D), support (N, D), both L2-normalized; `exclude` (B, N) bool: support rows a query
    may not use (its own caption at training time). Every query needs one usable row.
    """
    import torch

    logits = (query.float() @ support.float().T) / float(tau)
    if exclude is not None:
        if bool(exclude.all(dim=1).any()):
            raise LarcqError("drcap: a caption has no other caption in the support to project onto; "
                             "the datastore needs at least two distinct captions")
        logits = logits.masked_fill(exclude, float("-inf"))
    return torch.softmax(logits, dim=-1) @ support.float()


def pick_similar(sims: np.ndarray, k: int, band: Optional[tuple[float, float]] = None,
                 rng: Optional[np.random.Generator] = None, exclude: Optional[np.ndarray] = None) -> list[int]:
    """Indices of up to k support rows for one query, most similar first.

    Without `band` (test time): the top k. With `band` (training): a random sample of the rows with
    low < similarity < high when there are any, else the top k. `exclude`: rows never picked.
    """
    sims = np.asarray(sims, dtype=np.float64)
    ok = np.ones(len(sims), dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    if k <= 0 or not ok.any():
        return []
    if band is not None:
        in_band = np.flatnonzero(ok & (sims > band[0]) & (sims < band[1]))
        if len(in_band):
            rng = rng if rng is not None else np.random.default_rng()
            chosen = rng.choice(in_band, size=min(k, len(in_band)), replace=False)
            return [int(i) for i in sorted(chosen, key=lambda i: (-sims[i], i))]
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((idx, -sims[idx]))]  # by similarity, ties by index: deterministic
    return [int(i) for i in order[:k]]


# -- the model --------------------------------------------------------------------------------

class DrCap:
    """The model: a torch module (`.module`: projector + decoder, what Ray Train's DDP wraps and the
    optimizer sees), a frozen CLAP beside it, the datastore, the tokenizer. Build fresh from a
    config and the datastore's captions (random projector), or load a trained folder."""

    def __init__(self, cfg: DrcapConfig, *, captions: Optional[list[str]] = None,
                 folder: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                 trainable: bool = False, local_files_only: bool = False):
        import torch
        from torch import nn

        from larcq_ray.caption.prefix_decoder import hidden_size, load_decoder
        from larcq_ray.models.clap import AudioFeaturizer, load_clap_model, load_tokenizer

        folder = Path(folder) if folder is not None else None
        if folder is None and captions is None:
            raise LarcqError("drcap: a fresh captioner needs the datastore's captions")
        self.cfg, self.device = cfg, torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.trainable = trainable

        # CLAP: frozen, float32 (small; the support's softmax at tau ~ 0.01-0.07 wants the precision).
        clap_name = _resolve(cfg.clap.name_or_path, folder)
        clap_adapter = _resolve(cfg.clap.adapter, folder)
        self.clap = load_clap_model(clap_name, device=str(self.device), dtype="float32",
                                    local_files_only=local_files_only, adapter=clap_adapter)
        for p in self.clap.parameters():
            p.requires_grad = False
        self.clap_tokenizer = load_tokenizer(clap_name, local_files_only)
        text_cfg = self.clap.config.text_config
        self._clap_max_tokens = int(min(self.clap_tokenizer.model_max_length, text_cfg.max_position_embeddings - 2))
        self.featurizer = AudioFeaturizer(clap_name, local_files_only=local_files_only)
        self.sample_rate = self.featurizer.sample_rate
        self.max_seconds = self.featurizer.max_samples / self.sample_rate
        # Audio-to-text: ClapModel scales a @ t^T (logits_per_audio) by exp(logit_scale_a).
        self.tau = float(1.0 / self.clap.logit_scale_a.detach().float().exp().item())

        dec = cfg.decoder.model_copy(update={"name_or_path": _resolve(cfg.decoder.name_or_path, folder)})
        full = folder / "decoder" if folder is not None and (folder / "decoder").is_dir() else None
        adapter = folder / "decoder_adapter" if folder is not None and (folder / "decoder_adapter").is_dir() else None
        self.tokenizer, decoder = load_decoder(dec, dtype=self.dtype, device=self.device,
                                               adapter_dir=str(adapter) if adapter else None,
                                               full_dir=str(full) if full else None, trainable=trainable,
                                               local_files_only=local_files_only)
        dim = int(self.clap.config.projection_dim)
        hid = hidden_size(decoder)
        p = cfg.prefix_tokens
        if cfg.projector == "linear":
            projector = nn.Linear(dim, p * hid)
        else:
            width = cfg.projector_hidden or hid
            projector = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, p * hid))
        projector = projector.to(self.device, self.dtype)

        class Module(nn.Module):  # one module, so DDP and optimizers see every trainable part
            def __init__(self):
                super().__init__()
                self.projector, self.decoder = projector, decoder

        self.module = Module()
        if folder is not None:
            from safetensors.torch import load_file

            path = folder / PROJECTOR_FILE
            if not path.is_file():
                raise LarcqError(f"{folder} has no {PROJECTOR_FILE}: not a complete drcap captioner folder")
            try:
                projector.load_state_dict(load_file(str(path), device=str(self.device)))
            except RuntimeError as e:
                raise LarcqError(f"{path} does not fit the config's projector: "
                                 f"{str(e).splitlines()[0][:200]}") from None
            projector.to(self.device, self.dtype)
        for q in projector.parameters():
            q.requires_grad = trainable

        if captions is not None:
            self.set_datastore(captions)
        else:
            self._load_datastore(folder / DATASTORE_FILE)
        self.set_train(False)

    @classmethod
    def load(cls, folder: str | Path, **kw) -> "DrCap":
        cfg = read_config(folder)
        for name in (PROJECTOR_FILE, DATASTORE_FILE):  # before any weights load
            if not (Path(folder) / name).is_file():
                raise LarcqError(f"{folder} has no {name}: not a complete drcap captioner folder")
        return cls(cfg, folder=folder, **kw)

    # -- datastore --------------------------------------------------------------------------
    def set_datastore(self, captions: list[str], embeddings: Optional[np.ndarray] = None) -> None:
        """Replace the support and retrieval store (DRCap adapts to a domain by swapping it, no
        training). `embeddings`: their CLAP text embeddings, when already computed."""
        captions = [str(c) for c in captions]
        if embeddings is None:
            keep = list(dict.fromkeys(c for c in captions if c.strip()))
            embeddings = self.embed_texts(keep) if keep else np.zeros((0, 1), dtype=np.float32)
            captions = keep
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if not captions:
            raise LarcqError("drcap: the datastore holds no captions")
        dim = int(self.clap.config.projection_dim)
        if embeddings.shape != (len(captions), dim):
            raise LarcqError(f"drcap datastore: {embeddings.shape} embeddings for {len(captions)} captions; "
                             f"this CLAP's embeddings have {dim} dimensions")
        import torch

        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self.captions = captions
        self.support = torch.as_tensor(embeddings / np.maximum(norms, 1e-12), device=self.device)
        self._keys: dict[str, list[int]] = {}
        for i, c in enumerate(captions):
            self._keys.setdefault(_same_caption_key(c), []).append(i)

    def _load_datastore(self, path: Path) -> None:
        import pyarrow.parquet as pq

        if not path.is_file():
            raise LarcqError(f"{path.parent} has no {DATASTORE_FILE}: not a complete drcap captioner folder")
        t = pq.read_table(path, columns=["caption", "embedding"])
        emb = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
        self.set_datastore(t.column("caption").to_pylist(), emb.reshape(len(t), -1))

    # -- CLAP -------------------------------------------------------------------------------
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, D) L2-normalized CLAP text embeddings (float32)."""
        import torch

        out = []
        for i in range(0, len(texts), _EMBED_BATCH):
            enc = self.clap_tokenizer(list(texts[i:i + _EMBED_BATCH]), padding=True, truncation=True,
                                      max_length=self._clap_max_tokens, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                f = self.clap.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                f = getattr(f, "pooler_output", f)
                out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, int(self.clap.config.projection_dim)), np.float32)

    def embed_audio(self, waves: list[np.ndarray]):
        """(B, D) L2-normalized CLAP audio embeddings (float32 tensor) of windows at `sample_rate`."""
        import torch

        feats = [self.featurizer(np.asarray(w, dtype=np.float32)) for w in waves]
        x = torch.as_tensor(np.stack([f.input_features for f in feats])).to(self.device)
        longer = torch.as_tensor(np.array([[f.is_longer] for f in feats], dtype=bool)).to(self.device)
        with torch.inference_mode():
            f = self.clap.get_audio_features(input_features=x, is_longer=longer)
            f = getattr(f, "pooler_output", f)
            return torch.nn.functional.normalize(f.float(), dim=-1).clone()

    def _text_embeddings(self, captions: list[str]):
        """CLAP text embeddings of training captions: the datastore's when it holds them."""
        import torch

        rows: list[Optional[int]] = [self._keys.get(_same_caption_key(c), [None])[0] for c in captions]
        missing = [c for c, r in zip(captions, rows) if r is None]
        fresh = iter(torch.as_tensor(self.embed_texts(missing), device=self.device)) if missing else iter(())
        return torch.stack([self.support[r] if r is not None else next(fresh) for r in rows])

    # -- retrieval and projection -----------------------------------------------------------
    def self_mask(self, captions: list[str]):
        """(B, N) bool: the datastore rows that are the caption itself (same text up to case,
        spacing and a final period)."""
        import torch

        mask = torch.zeros(len(captions), len(self.captions), dtype=torch.bool, device=self.device)
        for i, c in enumerate(captions):
            for j in self._keys.get(_same_caption_key(c), []):
                mask[i, j] = True
        return mask

    def retrieve(self, queries, *, exclude=None, rng: Optional[np.random.Generator] = None,
                 training: bool = False) -> list[list[str]]:
        """Similar datastore captions per query embedding: training, sampled from the band
        (excluding `exclude`); test time, the top `top_k`."""
        sims = (queries.float() @ self.support.T).cpu().numpy()
        ex = exclude.cpu().numpy() if exclude is not None else None
        band = self.cfg.retrieval_band if training else None
        return [[self.captions[j] for j in pick_similar(sims[i], self.cfg.top_k, band, rng,
                                                        None if ex is None else ex[i])]
                for i in range(len(sims))]

    def retrieve_for_text(self, captions: list[str], rng=None) -> list[list[str]]:
        """Training-time retrieval for target captions (never the caption itself)."""
        return self.retrieve(self._text_embeddings(captions), exclude=self.self_mask(captions),
                             rng=np.random.default_rng(rng), training=True)

    def retrieve_for_audio(self, embeddings) -> list[list[str]]:
        """Test-time retrieval: the top `top_k` captions for each CLAP audio embedding."""
        return self.retrieve(embeddings)

    def prefix(self, latents, exclude=None):
        """(B, prefix_tokens, hidden) decoder embeddings from CLAP embeddings (audio, or text when training)."""
        e = project_onto_support(latents, self.support, self.tau, exclude)
        out = self.module.projector(e.to(self.dtype))
        return out.reshape(len(latents), self.cfg.prefix_tokens, -1)

    def set_train(self, on: bool) -> None:
        self.module.train(on)
        self.clap.eval()
        if self.cfg.decoder.train == "frozen" or not self.trainable:
            self.module.decoder.eval()

    # -- use --------------------------------------------------------------------------------
    def loss_from_text(self, captions: list[str], rng=None):
        """The training loss on captions alone (the caption's CLAP text embedding stands in for audio)."""
        from larcq_ray.caption.prefix_decoder import decoder_loss

        captions = [str(c) for c in captions]
        rng = np.random.default_rng(rng)
        t = self._text_embeddings(captions)
        exclude = self.self_mask(captions)
        before = [join_retrieved(r) for r in self.retrieve(t, exclude=exclude, rng=rng, training=True)]
        return decoder_loss(self.module.decoder, self.tokenizer, self.prefix(t, exclude), self.cfg.prompt,
                            captions, before=before)

    def _audio_inputs(self, waves: list[np.ndarray]):
        import torch

        a = self.embed_audio(waves)
        before = [join_retrieved(r) for r in self.retrieve_for_audio(a)]
        with torch.inference_mode():
            prefix = self.prefix(a)
        return prefix, before

    def generate_from_audio(self, waves: list[np.ndarray], num_beams: int = 4, max_new_tokens: int = 32,
                            do_sample: bool = False) -> list[str]:
        """Captions for windows (mono float32 at `sample_rate`). DRCap decodes with 4 beams."""
        from larcq_ray.caption.prefix_decoder import decoder_generate

        if not waves:
            return []
        prefix, before = self._audio_inputs(waves)
        return decoder_generate(self.module.decoder, self.tokenizer, prefix, self.cfg.prompt, before,
                                num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=do_sample)

    def candidates(self, waves: list[np.ndarray], beam_sizes: list[int], max_new_tokens: int = 32,
                   do_sample: bool = False) -> list[list[str]]:
        """Per window, one caption per beam size (CLAP-Refine's candidates), in `beam_sizes` order.
        CLAP, retrieval and the projection run once; only decoding repeats."""
        from larcq_ray.caption.prefix_decoder import decoder_generate

        if not waves:
            return []
        prefix, before = self._audio_inputs(waves)
        per_beam = [decoder_generate(self.module.decoder, self.tokenizer, prefix, self.cfg.prompt, before,
                                     num_beams=b, max_new_tokens=max_new_tokens, do_sample=do_sample)
                    for b in beam_sizes]
        return [list(c) for c in zip(*per_beam)]

    def save(self, folder: str | Path, extra: Optional[dict] = None) -> Path:
        """Write the captioner folder (what the caption job loads)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        m = self.module
        save_file({k: v.detach().contiguous().cpu() for k, v in m.projector.state_dict().items()},
                  str(folder / PROJECTOR_FILE))
        emb = self.support.detach().cpu().numpy().astype(np.float32)
        table = pa.table({"caption": pa.array(self.captions, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()),
                                                                         emb.shape[1])})
        pq.write_table(table, folder / DATASTORE_FILE)
        if self.cfg.decoder.train == "lora":
            m.decoder.save_pretrained(str(folder / "decoder_adapter"))
        elif self.cfg.decoder.train == "full":
            m.decoder.save_pretrained(str(folder / "decoder"))
            self.tokenizer.save_pretrained(str(folder / "decoder"))
        cfg = self.cfg.model_copy(update={"trained": extra}) if extra is not None else self.cfg
        (folder / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return folder


# -- the caption backend ----------------------------------------------------------------------

def _clap_limits(cfg: DrcapConfig, folder: Path, local_files_only: bool) -> tuple[int, float, bool]:
    """(sample rate, max input seconds, fused) of the captioner's CLAP, without its weights."""
    from larcq_ray.models.clap import cached_featurizer

    feat = cached_featurizer(_resolve(cfg.clap.name_or_path, folder), 0, local_files_only)
    return feat.sample_rate, feat.max_samples / feat.sample_rate, feat.fusion


def _window_s(cfg: CaptionBackendConfig, max_s: float, fused: bool) -> float:
    if cfg.window_s is None:
        return float(max_s)
    if cfg.window_s > max_s + 1e-6 and not fused:
        raise LarcqError(f"caption.window_s {cfg.window_s:g} s is longer than the drcap captioner's CLAP takes in "
                         f"one input ({max_s:g} s; it is not a fusion CLAP, so the rest would be cut off); "
                         "lower it or leave it unset")
    return float(cfg.window_s)


def _check_backend_cfg(cfg: CaptionBackendConfig) -> Path:
    if cfg.adapter:
        raise LarcqError("caption.adapter does not apply to a drcap captioner: its folder holds its own "
                         "decoder adapter (decoder_adapter/); leave caption.adapter unset")
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise LarcqError(f"drcap captioner {cfg.model!r} is not a folder; train one with `larcq-ray train-captioner`")
    return folder


def describe_folder(cfg: CaptionBackendConfig) -> BackendSpec:
    """What the caption job needs before any actor starts, without loading weights (fails fast):
    name = the folder, the CLAP's sample rate, the window, the prompt the captioner was trained with."""
    folder = _check_backend_cfg(cfg)
    dc = read_config(folder)
    sr, max_s, fused = _clap_limits(dc, folder, cfg.local_files_only)
    return BackendSpec(str(cfg.model), sr, _window_s(cfg, max_s, fused), dc.prompt)


class DrcapBackend:
    """CaptionBackend over a drcap folder: windows in batches of `batch_size`; with `clap_refine`,
    one candidate per beam size and the CLAP-Refine pick."""

    def __init__(self, cfg: CaptionBackendConfig):
        from larcq_ray.core.devices import resolve_device, resolve_dtype

        self.cfg = cfg
        folder = _check_backend_cfg(cfg)
        device = resolve_device(cfg.device, "caption.backend.device")
        dtype = resolve_dtype(cfg.dtype, device)
        self.model = DrCap.load(folder, device=device, dtype=dtype, local_files_only=cfg.local_files_only)
        self.name = str(cfg.model)
        self.prompt = self.model.cfg.prompt
        self.sample_rate = self.model.sample_rate
        self.window_s = _window_s(cfg, self.model.max_seconds, self.model.featurizer.fusion)
        self.refiner = None
        if cfg.clap_refine is not None:
            from larcq_ray.caption.clap_refine import ClapRefiner

            self.refiner = ClapRefiner(cfg.clap_refine, device, sample_rate=self.sample_rate,
                                       local_files_only=cfg.local_files_only)

    def caption(self, waveforms: list[np.ndarray]) -> list[str]:
        out: list[str] = []
        bs = self.cfg.batch_size
        for i in range(0, len(waveforms), bs):
            waves = [np.asarray(w, dtype=np.float32) for w in waveforms[i:i + bs]]
            if self.refiner is not None:
                cands = self.model.candidates(waves, self.cfg.clap_refine.beam_sizes,
                                              max_new_tokens=self.cfg.max_new_tokens, do_sample=self.cfg.do_sample)
                out.extend(self.refiner.pick(waves, cands))
            else:
                out.extend(self.model.generate_from_audio(waves, num_beams=self.cfg.num_beams,
                                                          max_new_tokens=self.cfg.max_new_tokens,
                                                          do_sample=self.cfg.do_sample))
        return out
