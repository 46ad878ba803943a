"""ALBERT: one shared layer applied num_hidden_layers times, factorised embeddings.

The teacher's "layer g" is the g-th application of the shared layer (the registry numbers attention
calls, which is exactly that). A student is an ALBERT with fewer applications of one shared layer;
teacher initialisation copies the shared layer and the embeddings (truncated to the student's
widths) whatever the mapping, since every application shares the same weights. Only one layer group
with one inner layer is supported, the layout of every released ALBERT."""

from ..errors import UserError
from .base import Family


class Albert(Family):
    name = "ALBERT"
    model_types = ("albert",)
    layers_path = "encoder.albert_layer_groups"
    layers_note = " (an ALBERT's layers are the applications of its one shared layer)"

    def check_config(self, config, what: str) -> None:
        if getattr(config, "num_hidden_groups", 1) != 1 or getattr(config, "inner_group_num", 1) != 1:
            raise UserError(f"{what} is an ALBERT with {config.num_hidden_groups} layer groups of "
                            f"{config.inner_group_num} layers; fastkd distills ALBERTs of one shared layer "
                            "(num_hidden_groups=1, inner_group_num=1), as released")

    def layer_prefix(self, model) -> str:
        return ""  # no per-layer weights: every name is copied as it is

    def student_config(self, teacher_config, layers, hidden, heads, ffn, teacher_layers):
        config = super().student_config(teacher_config, layers, hidden, heads, ffn, teacher_layers)
        config.num_hidden_groups = 1
        config.inner_group_num = 1
        return config


ALBERT = Albert()
