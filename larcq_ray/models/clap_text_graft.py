"""Put a pretrained BERT-family encoder (e.g. all-MiniLM-L6-v2) in the text tower of a ClapModel.

transformers' ClapTextModel is RoBERTa-shaped: the same parameter names as BertModel, but its
position ids start at ``pad_token_id + 1`` instead of 0. With BERT's ``pad_token_id = 0`` that
is a shift by one: CLAP position row ``i + 1`` takes BERT row ``i``. After the copy the CLAP text
tower returns the BERT's hidden states exactly (tested), so a CLAP can start from a real sentence
encoder when no pretrained CLAP can be fetched. The tokenizer (WordPiece) comes along.
"""

from __future__ import annotations

from pathlib import Path

from larcq_ray.core.errors import LarcqError


def load_bert(path: str | Path):
    """(BertModel, its tokenizer) from a local folder; a clear error for anything else."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LarcqError(f"text encoder folder {str(path)!r} has no config.json (give a local BERT-family model folder)")
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if cfg.model_type != "bert":
        raise LarcqError(f"text encoder {str(path)!r} is a {cfg.model_type!r} model; only BERT-family encoders "
                         "(model_type 'bert', e.g. all-MiniLM-L6-v2) can be grafted into the CLAP text tower")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise LarcqError(f"text encoder {str(path)!r} uses {cfg.position_embedding_type!r} positions; only absolute ones map")
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != cfg.pad_token_id:
        raise LarcqError(f"text encoder {str(path)!r}: tokenizer pad id {tokenizer.pad_token_id} != config pad id "
                         f"{cfg.pad_token_id}")
    return model, tokenizer


def clap_text_config_from_bert(bert_config, projection_dim: int) -> dict:
    """ClapTextConfig arguments that make the CLAP text tower the same network as `bert_config`."""
    return dict(
        vocab_size=bert_config.vocab_size,
        hidden_size=bert_config.hidden_size,
        num_hidden_layers=bert_config.num_hidden_layers,
        num_attention_heads=bert_config.num_attention_heads,
        intermediate_size=bert_config.intermediate_size,
        hidden_act=bert_config.hidden_act,
        layer_norm_eps=bert_config.layer_norm_eps,
        type_vocab_size=bert_config.type_vocab_size,
        pad_token_id=bert_config.pad_token_id,
        # one more row: CLAP positions start at pad_token_id + 1
        max_position_embeddings=bert_config.max_position_embeddings + bert_config.pad_token_id + 1,
        projection_dim=projection_dim,
    )


def graft_bert_into_clap(clap_model, bert) -> None:
    """Copy `bert`'s weights into `clap_model.text_model` (in place), positions shifted by pad_id + 1."""
    import torch

    src = bert.state_dict()
    dst = clap_model.text_model.state_dict()
    shift = bert.config.pad_token_id + 1
    missing = [k for k in dst if k not in src and not k.endswith(("position_ids", "token_type_ids"))]
    if missing:
        raise LarcqError(f"cannot graft the text encoder: CLAP text weights {missing[:5]} have no BERT counterpart")
    with torch.no_grad():
        for name, tensor in dst.items():
            if name.endswith(("position_ids", "token_type_ids")):
                continue  # buffers, sized by the CLAP config
            value = src[name]
            if name == "embeddings.position_embeddings.weight":
                tensor.zero_()
                tensor[shift:shift + value.shape[0]] = value
                continue
            if value.shape != tensor.shape:
                raise LarcqError(f"cannot graft the text encoder: {name} is {tuple(value.shape)} in BERT, "
                                 f"{tuple(tensor.shape)} in CLAP")
            tensor.copy_(value)
