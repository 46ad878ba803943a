"""BERT and the families laid out like it (encoder.layer, attention through the registry)."""

from .base import Family


class BertLike(Family):
    name = "BERT"
    model_types = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "data2vec-text", "ernie",
                   "roberta-prelayernorm", "xlm-roberta-xl", "xmod")


BERT = BertLike()
