"""DeBERTa-v2 and v3 (model type deberta-v2): disentangled attention.

Its scores are q k^T / sqrt(d * f) plus content->position and position->content terms (f counts the
terms), so a Q/K record would miss most of what the layer attends by. The score hooks record the
full pre-softmax scores on each layer's attention.self (padding already filled with the dtype's
minimum) and the losses run the torch reference on them: memory B x H x S x S per mapped layer, as
the model's own eager attention already spends. A fused form would have to recompute the relative
terms tile by tile (gathers into the relative-position embeddings): not built, see the README."""

from .base import Family


class Deberta(Family):
    name = "DeBERTa-v2/v3"
    model_types = ("deberta-v2",)
    capture = "scores"
    attention_path = "attention.self"
    projections = ("query_proj", "key_proj", "value_proj")


DEBERTA = Deberta()
