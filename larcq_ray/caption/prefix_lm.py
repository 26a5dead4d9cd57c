"""The prefix-lm captioner, the shape SLAM-AAC, SALMONN and GAMA share:

    audio window -> audio encoder frames -> connector -> prefix embeddings -> causal LM -> caption

A captioner is a folder that `larcq-ray train-captioner` writes and the caption job loads:

    captioner.json          PrefixLmConfig: encoder, connector, decoder, prompt (+ what trained it)
    connector.safetensors   the connector's weights (always trained)
    encoder.safetensors     the encoder's weights, when training changed them
    decoder_adapter/        the decoder's LoRA adapter (decoder.train: lora)
    decoder/                the whole decoder and its tokenizer (decoder.train: full)

`encoder.name_or_path` / `decoder.name_or_path` are hub ids or folders; a relative path is read
relative to the captioner folder, so a captioner can ship its base models inside it.

The caption job reads a folder with `describe_folder` (config and feature extractor only, on the
driver) and captions with `PrefixLmBackend` (the model, once per actor); with `clap_refine` set, each
window is decoded once per beam size and CLAP picks among the candidates (caption/clap_refine.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pydantic

from larcq_ray.caption.config import BackendSpec, CaptionBackendConfig
from larcq_ray.caption.connectors import ConnectorSpec
from larcq_ray.caption.prefix_decoder import DEFAULT_PROMPT, DecoderSpec
from larcq_ray.core.errors import LarcqError

CONFIG_FILE = "captioner.json"
CONNECTOR_FILE = "connector.safetensors"
ENCODER_FILE = "encoder.safetensors"
# An input key holding precomputed encoder frames (B, T, D): a frozen encoder's output, which
# train-captioner computes once per clip instead of at every step (cache_encoder_frames).
FRAMES_INPUT = "encoder_frames"


class EncoderSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    name_or_path: str  # CLAP (ours included), Whisper, AST, or another transformers audio model
    type: Literal["clap", "whisper", "ast", "auto"] = "auto"  # auto: from the model's config
    train: bool = False  # SLAM-AAC keeps its encoder frozen


class PrefixLmConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    kind: Literal["prefix-lm"] = "prefix-lm"
    encoder: EncoderSpec
    connector: ConnectorSpec = pydantic.Field(default_factory=ConnectorSpec)
    decoder: DecoderSpec
    prompt: str = DEFAULT_PROMPT
    trained: Optional[dict] = None  # what train-captioner recorded (steps, data, validation figures)


def read_config(folder: str | Path) -> PrefixLmConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise LarcqError(f"{folder} is not a prefix-lm captioner folder (no {CONFIG_FILE}); "
                         "train one with `larcq-ray train-captioner`")
    try:
        return PrefixLmConfig.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, pydantic.ValidationError) as e:
        raise LarcqError(f"{path} is not a valid prefix-lm config: {str(e).splitlines()[0][:300]}") from None


def _resolve(name: str, folder: Optional[Path]) -> str:
    if folder is not None and not Path(name).is_absolute() and (folder / name).exists():
        return str((folder / name).resolve())
    return name


class PrefixLm:
    """The model: a torch module (`.module`, what Ray Train's DDP wraps) plus its tokenizer and
    feature extractor. Build fresh from a config (random connector), or load a trained folder."""

    def __init__(self, cfg: PrefixLmConfig, *, folder: str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32", trainable: bool = False, local_files_only: bool = False):
        import torch
        from torch import nn

        from larcq_ray.caption import audio_encoders as ae
        from larcq_ray.caption.connectors import build_connector
        from larcq_ray.caption.prefix_decoder import hidden_size, load_decoder

        folder = Path(folder) if folder is not None else None
        self.cfg, self.device = cfg, torch.device(device)
        self.dtype = getattr(torch, dtype)
        enc_name = _resolve(cfg.encoder.name_or_path, folder)
        self.kind = ae.encoder_type(enc_name, cfg.encoder.type, local_files_only)
        self.fe = ae.load_feature_extractor(enc_name, self.kind, local_files_only)
        self.sample_rate = int(self.fe.sampling_rate)
        self.max_seconds = ae.max_seconds(self.fe, self.kind)
        encoder = ae.build_encoder_module(enc_name, self.kind, local_files_only)

        dec = cfg.decoder.model_copy(update={"name_or_path": _resolve(cfg.decoder.name_or_path, folder)})
        full = folder / "decoder" if folder is not None and (folder / "decoder").is_dir() else None
        adapter = folder / "decoder_adapter" if folder is not None and (folder / "decoder_adapter").is_dir() else None
        self.tokenizer, decoder = load_decoder(dec, dtype=self.dtype, device=self.device,
                                               adapter_dir=str(adapter) if adapter else None,
                                               full_dir=str(full) if full else None, trainable=trainable,
                                               local_files_only=local_files_only)
        encoder = encoder.to(self.device, self.dtype)
        with torch.no_grad():  # the frame width the connector reads
            probe = self._tensors(ae.featurize(self.fe, self.kind, [np.zeros(self.sample_rate, dtype=np.float32)]))
            in_dim = int(ae.frames(encoder, self.kind, probe).shape[-1])
        connector = build_connector(cfg.connector, in_dim, hidden_size(decoder)).to(self.device, self.dtype)

        class Module(nn.Module):  # one module, so DDP and optimizers see every part
            def __init__(self):
                super().__init__()
                self.encoder, self.connector, self.decoder = encoder, connector, decoder

        self.module = Module()
        if folder is not None:
            from safetensors.torch import load_file

            connector.load_state_dict(load_file(str(folder / CONNECTOR_FILE), device=str(self.device)))
            if (folder / ENCODER_FILE).is_file():
                encoder.load_state_dict(load_file(str(folder / ENCODER_FILE), device=str(self.device)))
        for p in encoder.parameters():
            p.requires_grad = bool(trainable and cfg.encoder.train)
        for p in connector.parameters():
            p.requires_grad = trainable
        self.set_train(False)

    @classmethod
    def load(cls, folder: str | Path, **kw) -> "PrefixLm":
        return cls(read_config(folder), folder=folder, **kw)

    # -- parts ------------------------------------------------------------------------------
    def _tensors(self, arrays: dict) -> dict:
        import torch

        out = {}
        for k, v in arrays.items():
            a = np.asarray(v)
            t = torch.as_tensor(a if a.flags.writeable else a.copy()).to(self.device)  # Ray Data's are read-only
            out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def featurize(self, waves: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Encoder inputs (numpy) for mono float32 windows at `sample_rate`: CPU work, Ray tasks can do it."""
        from larcq_ray.caption.audio_encoders import featurize

        return featurize(self.fe, self.kind, waves)

    def prefix(self, features: dict):
        from larcq_ray.caption.audio_encoders import frames

        m = self.module
        if FRAMES_INPUT in features:
            return m.connector(self._tensors({FRAMES_INPUT: features[FRAMES_INPUT]})[FRAMES_INPUT])
        return m.connector(frames(m.encoder, self.kind, self._tensors(features)))

    def set_train(self, on: bool) -> None:
        self.module.train(on)
        if not self.cfg.encoder.train:
            self.module.encoder.eval()  # frozen: its BatchNorm / dropout stay in inference mode

    # -- use --------------------------------------------------------------------------------
    def loss(self, features: dict, targets: list[str]):
        from larcq_ray.caption.prefix_decoder import decoder_loss

        return decoder_loss(self.module.decoder, self.tokenizer, self.prefix(features), self.cfg.prompt, targets)

    def generate(self, features: dict, *, num_beams: int = 1, max_new_tokens: int = 32,
                 do_sample: bool = False) -> list[str]:
        import torch

        with torch.inference_mode():
            prefix = self.prefix(features)
        return self._decode(prefix, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=do_sample)

    def candidates(self, features: dict, beam_sizes: list[int], *, max_new_tokens: int = 32,
                   do_sample: bool = False) -> list[list[str]]:
        """Per window, one caption per beam size (CLAP-Refine's candidates), in `beam_sizes` order.
        The encoder and the connector run once; only decoding repeats."""
        import torch

        with torch.inference_mode():
            prefix = self.prefix(features)
        per_beam = [self._decode(prefix, num_beams=b, max_new_tokens=max_new_tokens, do_sample=do_sample)
                    for b in beam_sizes]
        return [list(c) for c in zip(*per_beam)]

    def _decode(self, prefix, *, num_beams: int, max_new_tokens: int, do_sample: bool) -> list[str]:
        from larcq_ray.caption.prefix_decoder import decoder_generate

        return decoder_generate(self.module.decoder, self.tokenizer, prefix, self.cfg.prompt, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, do_sample=do_sample)

    def save(self, folder: str | Path, extra: Optional[dict] = None) -> Path:
        """Write the captioner folder (what the caption job loads)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        m = self.module
        save_file({k: v.detach().contiguous().cpu() for k, v in m.connector.state_dict().items()},
                  str(folder / CONNECTOR_FILE))
        if self.cfg.encoder.train:
            save_file({k: v.detach().contiguous().cpu() for k, v in m.encoder.state_dict().items()},
                      str(folder / ENCODER_FILE))
        if self.cfg.decoder.train == "lora":
            m.decoder.save_pretrained(str(folder / "decoder_adapter"))
        elif self.cfg.decoder.train == "full":
            m.decoder.save_pretrained(str(folder / "decoder"))
            self.tokenizer.save_pretrained(str(folder / "decoder"))
        cfg = self.cfg.model_copy(update={"trained": extra}) if extra is not None else self.cfg
        (folder / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(), indent=2))
        return folder


# -- the caption backend ----------------------------------------------------------------------


def _check_backend_cfg(cfg: CaptionBackendConfig) -> Path:
    if cfg.adapter:
        raise LarcqError("caption.adapter does not apply to a prefix-lm captioner: its folder holds its own "
                         "decoder adapter (decoder_adapter/); leave caption.adapter unset")
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise LarcqError(f"prefix-lm captioner {cfg.model!r} is not a folder; train one with "
                         "`larcq-ray train-captioner`")
    return folder


def _window_s(cfg: CaptionBackendConfig, limit: float | None, folder: Path) -> float:
    if cfg.window_s is None:
        if limit is None:
            raise LarcqError(f"the encoder of the prefix-lm captioner {folder} has no fixed input length; "
                             "set caption.window_s")
        return float(limit)
    if limit is not None and cfg.window_s > limit + 1e-6:
        raise LarcqError(f"caption.window_s {cfg.window_s:g} s is longer than the encoder of the prefix-lm "
                         f"captioner {folder} takes in one input ({limit:g} s); lower it or leave it unset")
    return float(cfg.window_s)


def describe_folder(cfg: CaptionBackendConfig) -> BackendSpec:
    """What the caption job needs before any actor starts, without loading weights (fails fast):
    name = the folder, the encoder's sample rate, the window, the prompt the captioner was trained with."""
    from larcq_ray.caption import audio_encoders as ae

    folder = _check_backend_cfg(cfg)
    pc = read_config(folder)
    if not (folder / CONNECTOR_FILE).is_file():
        raise LarcqError(f"{folder} holds no {CONNECTOR_FILE} (an incomplete prefix-lm captioner folder)")
    enc = _resolve(pc.encoder.name_or_path, folder)
    kind = ae.encoder_type(enc, pc.encoder.type, cfg.local_files_only)
    fe = ae.load_feature_extractor(enc, kind, cfg.local_files_only)
    return BackendSpec(str(cfg.model), int(fe.sampling_rate), _window_s(cfg, ae.max_seconds(fe, kind), folder),
                        pc.prompt)


class PrefixLmBackend:
    """CaptionBackend over a prefix-lm folder: windows in batches of `batch_size`; with `clap_refine`,
    one candidate per beam size and the CLAP-Refine pick. Built once per caption actor."""

    def __init__(self, cfg: CaptionBackendConfig):
        from larcq_ray.core.devices import resolve_device, resolve_dtype

        spec = describe_folder(cfg)
        self.cfg = cfg
        self.name, self.sample_rate, self.window_s, self.prompt = spec.name, spec.sample_rate, spec.window_s, spec.prompt
        device = resolve_device(cfg.device, "caption.backend.device")
        dtype = resolve_dtype(cfg.dtype, device)
        self.model = PrefixLm.load(cfg.model, device=device, dtype=dtype, local_files_only=cfg.local_files_only)
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
            feats = self.model.featurize(waves)
            if self.refiner is not None:
                cands = self.model.candidates(feats, self.cfg.clap_refine.beam_sizes,
                                              max_new_tokens=self.cfg.max_new_tokens, do_sample=self.cfg.do_sample)
                out.extend(self.refiner.pick(waves, cands))
            else:
                out.extend(self.model.generate(feats, num_beams=self.cfg.num_beams,
                                               max_new_tokens=self.cfg.max_new_tokens, do_sample=self.cfg.do_sample))
        return out
