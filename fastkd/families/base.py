"""The interface every encoder family implements, with the BERT layout as its defaults.

What the rest of fastkd asks of a family: where the layers are, the model's sizes, a student config
of the same family with other sizes, how attention is captured (the registry or score hooks), how
teacher weights go into a student, and which inputs its forward takes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from torch import nn

from ..capture import hook_scores, unhook_scores, use_registry


class Family:
    name = "BERT"
    model_types: tuple[str, ...] = ()
    layers_path = "encoder.layer"  # the list of layers, from the bare encoder
    # "registry": attention runs through transformers' attention registry (Q/K recorded, fused losses);
    # "scores": module hooks record the family's full pre-softmax scores (the reference losses).
    capture = "registry"
    attention_path = ""  # scores capture: each layer's self-attention module, from the layer
    projections: tuple[str, ...] = ()  # scores capture: its Q, K, V linear submodules (relation terms)
    ffn_attr = "intermediate_size"
    layers_note = ""  # appended to a mapping error: what the teacher's "layers" are

    # --- reading a model or config ---------------------------------------------------------------
    def check_config(self, config, what: str) -> None:
        """Refuse (UserError, one line) a configuration of this family fastkd cannot distill."""

    def sizes(self, config) -> tuple[int, int, int, int]:
        """(layers, hidden, heads, FFN width) as a student shape counts them."""
        return (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                getattr(config, self.ffn_attr))

    def layers(self, model) -> nn.ModuleList:
        module = model.base_model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module

    def layer_prefix(self, model) -> str:
        """The state-dict prefix of layer 0 without its index, e.g. "encoder.layer."."""
        layers = self.layers(model)
        name = next(n for n, m in model.named_modules() if m is layers)
        return name + "." if name else ""

    # --- a teacher's forward ------------------------------------------------------------------------
    def layers_to_run(self, config, depth: int) -> int:
        """How many layers a forward must run for its hidden states and attention up to layer `depth` to be
        the full model's."""
        return min(max(depth, 1), config.num_hidden_layers)

    @contextlib.contextmanager
    def first_layers(self, model, count: int):
        """Inside the block `model` runs its first `count` layers and, a bare encoder, no pooler (what the
        losses never read: the layers past the deepest one a mapping uses cost a teacher forward up to half
        its time). hidden_states then holds count + 1 entries. Restored on leaving, whatever happens inside;
        a block inside another on the same model is refused (it would take the truncated model for whole)."""
        base = model.base_model
        total = model.config.num_hidden_layers
        if getattr(model, "_fastkd_truncated", False):
            raise RuntimeError("first_layers: the model is already truncated by an enclosing first_layers block")
        pooler = getattr(base, "pooler", None) if model is base else None  # (a task model's head reads it)
        layers = self.layers(model) if count < total else None
        owner, name = None, None
        if layers is not None:
            _hook_every_layer(model)
            owner = base
            for part in self.layers_path.split(".")[:-1]:
                owner = getattr(owner, part)
            name = self.layers_path.split(".")[-1]
        model._fastkd_truncated = True
        try:
            if pooler is not None:
                base.pooler = None
            if layers is not None:
                # Both the list and the count: some forwards loop over the list, some over the config.
                setattr(owner, name, nn.ModuleList(list(layers)[:count]))
                model.config.num_hidden_layers = count
            yield
        finally:
            if layers is not None:
                setattr(owner, name, layers)
                model.config.num_hidden_layers = total
            if pooler is not None:
                base.pooler = pooler
            model._fastkd_truncated = False

    # --- students --------------------------------------------------------------------------------
    # Widths a config may tie to the hidden size (ELECTRA's embeddings, DeBERTa's classification
    # pooler): they follow a narrower student where the teacher had them equal to its hidden size.
    TIED_TO_HIDDEN = ("embedding_size", "pooler_hidden_size")

    def student_config(self, teacher_config, layers: int, hidden: int, heads: int, ffn: int,
                       teacher_layers: list[int]):
        """teacher_layers: student layer m's teacher layer (1-based), for families whose layers differ
        in kind (ModernBERT); the others ignore it."""
        config = copy.deepcopy(teacher_config)
        config.num_hidden_layers = layers
        config.hidden_size = hidden
        config.num_attention_heads = heads
        setattr(config, self.ffn_attr, ffn)
        for name in self.TIED_TO_HIDDEN:
            if getattr(teacher_config, name, None) == teacher_config.hidden_size:
                setattr(config, name, hidden)
        return config

    @torch.no_grad()
    def copy_weights(self, teacher, student, teacher_layers: list[int]) -> None:
        """Student layer m <- teacher layer teacher_layers[m] (1-based), the rest by name; each tensor
        sliced to the student's shape. Where the student is wider (more FFN units, say), only the
        overlap is copied and the rest keeps its random initialisation."""
        t_state = teacher.state_dict()
        prefix = self.layer_prefix(student)
        for name, s_param in student.state_dict().items():
            source = name
            if prefix and name.startswith(prefix):
                index, _, rest = name[len(prefix):].partition(".")
                source = f"{prefix}{teacher_layers[int(index)] - 1}.{rest}"
            t_param = t_state.get(source)
            if t_param is None:
                continue  # a pooler the teacher was loaded without, a layer-0-only norm, ...
            self.copy_tensor(name, s_param, t_param)

    def copy_tensor(self, name: str, s_param: torch.Tensor, t_param: torch.Tensor) -> None:
        overlap = tuple(slice(0, min(s, t)) for s, t in zip(s_param.shape, t_param.shape))
        s_param[overlap] = t_param[overlap]

    # --- capture ---------------------------------------------------------------------------------
    def attention_modules(self, model) -> list[nn.Module]:
        modules = []
        for layer in self.layers(model):
            for part in self.attention_path.split("."):
                layer = getattr(layer, part)
            modules.append(layer)
        return modules

    def enable_capture(self, model) -> None:
        if self.capture == "registry":
            use_registry(model)
        else:
            hook_scores(self.attention_modules(model), self.projections)

    def disable_capture(self, model) -> None:
        """Back to the stock attention (before export: the saved config stays clean)."""
        if self.capture == "registry":
            model.set_attn_implementation(stock_attention(type(model)))
        else:
            unhook_scores(self.attention_modules(model))


def _hook_every_layer(model) -> None:
    """One full forward of two tokens, once per model, before it first runs truncated: transformers 5 installs
    the hooks that collect hidden_states on the first forward asking for them, on the modules present then,
    and never again. Installed on a truncated model, they would leave a later, deeper forward of the same
    model (the next search chunk's teacher) short of the layers past the first cut."""
    if getattr(model, "_fastkd_hooked_whole", False):
        return
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if takes_token_types(model):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    with torch.inference_mode():
        model(**inputs, output_hidden_states=True, return_dict=True)
    model._fastkd_hooked_whole = True


def stock_attention(model_class) -> str:
    """SDPA where the family's attention has an SDPA path, else eager."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def takes_token_types(model) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters
