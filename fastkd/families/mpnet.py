"""MPNet: encoder.layer like BERT, but its attention bypasses the registry and adds a relative
position bias (one per head, shared by all layers, from encoder.relative_attention_bias) to the
scaled Q K^T. The faithful scores to match are therefore the full pre-softmax scores, recorded by
score hooks on each layer's attention.attn; the losses run the torch reference on them."""

from .base import Family


class MPNet(Family):
    name = "MPNet"
    model_types = ("mpnet",)
    capture = "scores"
    attention_path = "attention.attn"
    projections = ("q", "k", "v")


MPNET = MPNet()
