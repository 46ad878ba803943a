"""fastkd: task-agnostic layer-wise distillation of BERT-family encoders, with searched layer mappings."""

__version__ = "0.1.0"
