"""The encoder families fastkd distills, one small module each behind one interface (base.Family).

| family        | layers            | attention capture                         | loss path      |
| BERT-like     | encoder.layer     | registry: Q, K                            | fused or torch |
| DistilBERT    | transformer.layer | registry: Q, K                            | fused or torch |
| ALBERT        | one shared layer  | registry: Q, K per application            | fused or torch |
| ModernBERT    | layers            | registry: rotated Q, K, sliding window    | fused (global), torch (local) |
| DeBERTa-v2/v3 | encoder.layer     | hooks: full scores (disentangled terms)   | torch          |
| MPNet         | encoder.layer     | hooks: full scores (relative bias)        | torch          |
"""

from __future__ import annotations

from ..errors import UserError
from .albert import ALBERT
from .base import Family, stock_attention, takes_token_types
from .bert import BERT
from .deberta import DEBERTA
from .distilbert import DISTILBERT
from .modernbert import MODERNBERT
from .mpnet import MPNET

FAMILIES: tuple[Family, ...] = (BERT, DISTILBERT, ALBERT, MODERNBERT, DEBERTA, MPNET)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" if f is not BERT else
                     f"{f.name}-like ({', '.join(f.model_types)})" for f in FAMILIES)


def is_encoder(config) -> bool:
    """Whether `config` is of an encoder family fastkd knows (without the distillation's own checks)."""
    return getattr(config, "model_type", None) in _BY_MODEL_TYPE


def family_of(model_or_config, what: str = "the model") -> Family:
    """The family of a model or config; an unsupported one is one line listing the supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UserError(f"{what} is a {model_type or 'unknown'} model; fastkd distills these encoder "
                        f"families: {supported()}")
    family.check_config(config, what)
    return family


def enable_capture(model) -> None:
    """Record attention in `recording` blocks (no cost outside them)."""
    family_of(model).enable_capture(model)


def disable_capture(model) -> None:
    """The model's stock attention again (before saving it)."""
    family_of(model).disable_capture(model)


# Families that number positions from pad_token_id + 1 (RoBERTa's scheme): the first pad_token_id + 1
# position embeddings are never a real token's.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "xlm-roberta-xl",
                     "xmod", "mpnet")


def usable_positions(config) -> int:
    """The longest sequence (in tokens) the model's position embeddings take."""
    n = config.max_position_embeddings
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        n -= (config.pad_token_id or 0) + 1
    return n


def model_inputs(model, batch: dict) -> dict:
    """The batch without token_type_ids for a family whose forward takes none (DistilBERT, MPNet,
    ModernBERT); such a model is single-segment and ignores them anyway."""
    if "token_type_ids" in batch and not takes_token_types(model):
        return {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


def compile_refusal(device, *configs) -> str | None:
    """Why --compile cannot run here (one line), or None: the toolchain for `device`, and families whose
    attention fastkd captures through transformers' registry (DeBERTa's and MPNet's score hooks enter a
    TorchFunctionMode inside the layer, which is not compiled)."""
    from ..device import compile_problem

    for config in configs:
        family = family_of(config)
        if family.capture != "registry":
            return (f"--compile does not support the {config.model_type} family (fastkd reads its attention "
                    "scores through hooks inside each layer); drop --compile")
    return compile_problem(device)


def compile_layers(model) -> None:
    """torch.compile each of the model's layers in place (nn.Module.compile: the module tree, its state_dict
    and what save_pretrained writes stay as they are). Per layer, not the whole model: the teacher's
    first_layers truncation swaps the list that holds them; inside a layer the graph breaks where fastkd's
    attention function keeps its record (fastkd.capture._next_layer, never traced), and where the dropout
    draws its seed from the run's generator (fastkd.ops.dropout.draw_seed)."""
    for layer in family_of(model, "the model").layers(model):
        if getattr(layer, "_compiled_call_impl", None) is None:  # (a teacher serving several students: once)
            layer.compile()


__all__ = ["FAMILIES", "Family", "compile_layers", "compile_refusal", "disable_capture", "enable_capture", "family_of", "is_encoder",
           "model_inputs", "stock_attention", "supported", "usable_positions"]
