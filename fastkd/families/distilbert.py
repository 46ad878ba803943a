"""DistilBERT: transformer.layer, q_lin/k_lin (through the registry), no token types; its config
names the sizes n_layers/dim/n_heads/hidden_dim (the first three aliased to BERT's names)."""

from .base import Family


class DistilBert(Family):
    name = "DistilBERT"
    model_types = ("distilbert",)
    layers_path = "transformer.layer"
    ffn_attr = "hidden_dim"


DISTILBERT = DistilBert()
