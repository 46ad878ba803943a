"""ModernBERT: a top-level `layers` list, rotary embeddings, alternating global and local attention.

Attention goes through the registry after the rotary embedding, so the recorded Q and K are the
rotated ones and scaling * q k^T is exactly the layer's score. A local (sliding-window) layer
records its window: its valid (query, key) pairs are |i - j| <= window as well as real tokens, and
the losses respect both (the fused ops know padding only, so local layers run the reference).
Batches stay padded: fastkd's attention function replaces flash-attention's unpadded path while
distilling (fastkd's corpus sequences are packed full, so little is padded anyway).

Student layer m is of the kind of the teacher layer it copies (global or local, with that kind's
window and rotary base): a teacher-initialised layer keeps the attention its weights were trained
with. The layers it copies are the mapping's (unsupervised layers take the uniform mapping's layer),
so a student layer is then supervised by a layer that attends the same way; with --init-layers they
are those layers instead, and a local layer may be supervised by a global one (the losses count the
narrower window's pairs). Two weights are
stacks: attn.Wqkv holds Q, K and V, mlp.Wi the input and gate halves of the GLU; a narrower student
takes the first rows of each part, never rows of Q as K."""

from .base import Family


class ModernBert(Family):
    name = "ModernBERT"
    model_types = ("modernbert",)
    layers_path = "layers"

    def layers_to_run(self, config, depth: int) -> int:
        # The last entry of hidden_states is the output of the final norm, not of the last layer run: one
        # layer past `depth` keeps layer `depth`'s entry the full model's.
        return min(max(depth, 1) + 1, config.num_hidden_layers)

    def student_config(self, teacher_config, layers, hidden, heads, ffn, teacher_layers):
        config = super().student_config(teacher_config, layers, hidden, heads, ffn, teacher_layers)
        config.layer_types = [teacher_config.layer_types[g - 1] for g in teacher_layers]
        return config

    STACKED = {"attn.Wqkv": 3, "mlp.Wi": 2}  # module -> parts stacked along the output rows

    def copy_tensor(self, name, s_param, t_param):
        module = name.rsplit(".", 1)[0]
        parts = next((n for suffix, n in self.STACKED.items() if module.endswith(suffix)), 1)
        for s_part, t_part in zip(s_param.chunk(parts, 0), t_param.chunk(parts, 0)):
            super().copy_tensor(name, s_part, t_part)


MODERNBERT = ModernBert()
