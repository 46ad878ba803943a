"""Sentence-embedding pipelines: a teacher's sentence-transformers modules carried to its student,
and zero-shot STS-B for any model that has them.

A sentence-transformers model directory holds the encoder (module path "") plus modules.json listing
the modules applied to its output: Pooling (1_Pooling/config.json: which pooling, over how many
dims) and often Normalize (no files). A student exported with the teacher's modules (Pooling resized
to the student's width) runs the teacher's pipeline under `SentenceTransformer(student_dir)`, instead
of a guessed mean pooling without the normalisation. Modules with weights of the teacher's width
(Dense, say) are copied for a student of the teacher's width; they cannot be carried to a narrower
student: the pipeline is then left out, said in one line. A narrower student distilled with the
sentence term learns a projection to the teacher's width instead; its pipeline carries it as a Dense
after the Pooling (sentence-transformers' own recipe for students of another width).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

PIPELINE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_CARRIED = {"Transformer", "Pooling", "Normalize"}
_SAME_WIDTH_ONLY = {"Dense"}  # weights of the teacher's width: they take a student of that width only


def has_pipeline(path) -> bool:
    return path is not None and (Path(path) / "modules.json").is_file()


def _modules(path: Path) -> list[dict]:
    return json.loads((path / "modules.json").read_text())


def copy_pipeline(teacher_dir, target: Path, hidden: int, dense: dict | None = None) -> str | None:
    """Write the teacher's sentence-transformers modules into `target` (a staged export) for a
    student of width `hidden`. Returns None when done, or why the pipeline was left out. `dense`: the
    sentence term's learned projection of a narrower student ({"weight", "bias"}, float32), written as
    a Dense module right after the Pooling, so the pipeline puts out embeddings of the teacher's width."""
    teacher_dir = Path(teacher_dir)
    try:
        modules = _modules(teacher_dir)
        kinds = {m["type"].rsplit(".", 1)[-1] for m in modules}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its modules.json is unreadable ({exc})"
    teacher_width = _encoder_width(teacher_dir)
    carried = _CARRIED | (_SAME_WIDTH_ONLY if teacher_width == hidden else set())
    left = kinds - carried
    if left and left <= _SAME_WIDTH_ONLY:
        widths = f" ({teacher_width}), not the student's ({hidden})" if teacher_width is not None else ""
        return f"its {', '.join(sorted(left))} module(s) hold weights of the teacher's width{widths}"
    if left:
        return (f"fastkd does not carry its {', '.join(sorted(left))} module(s) (only Pooling, Normalize, and Dense "
                "to a student of the teacher's width)")
    if any(m["type"].endswith("Transformer") and m.get("path", "") != "" for m in modules):
        return "its encoder is not at the directory's root"
    if dense is not None:
        modules = _with_dense(modules)
        if modules is None:
            return "its pipeline has no Pooling module for the learned projection (a Dense) to follow"
    for name in PIPELINE_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, target / name)
    if dense is not None:
        (target / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    for module in modules:
        kind, sub = module["type"].rsplit(".", 1)[-1], module.get("path", "")
        if kind == "Transformer" or not sub:
            continue
        (target / sub).mkdir(parents=True, exist_ok=True)
        if kind == "Dense" and dense is not None and sub == DENSE_PATH:
            _write_dense(target / sub, dense)
            continue
        source = teacher_dir / sub
        if source.is_dir():
            for f in source.iterdir():
                if f.is_file():
                    shutil.copy2(f, target / sub / f.name)
        if kind == "Pooling":
            config_path = target / sub / "config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {"pooling_mode_mean_tokens": True}
            # (sentence-transformers 5+ writes `embedding_dimension`; older versions the longer name)
            config["embedding_dimension" if "embedding_dimension" in config else "word_embedding_dimension"] = hidden
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    return None


DENSE_PATH = "sentence_dense"  # the learned projection's module folder in a student's pipeline


# The name every sentence-transformers release imports (6.x maps it to its own module path); a name
# built from the teacher's Pooling entry would not be (6.x writes ...modules.pooling.Pooling).
DENSE_TYPE = "sentence_transformers.models.Dense"


def _with_dense(modules: list[dict]) -> list[dict] | None:
    """The teacher's modules with a Dense right after its Pooling (renumbered: a module's `name` is its
    key), or None when it has no Pooling to follow."""
    out = []
    for module in modules:
        out.append(dict(module))
        if module["type"].endswith("Pooling"):
            out.append({"path": DENSE_PATH, "type": DENSE_TYPE})
    if len(out) == len(modules):
        return None
    return [{**m, "idx": i, "name": str(i)} for i, m in enumerate(out)]


def _write_dense(folder: Path, dense: dict) -> None:
    """sentence-transformers' Dense module files: a linear layer without activation (Identity)."""
    from safetensors.torch import save_file

    out_features, in_features = dense["weight"].shape
    (folder / "config.json").write_text(json.dumps(
        {"in_features": in_features, "out_features": out_features, "bias": True,
         "activation_function": "torch.nn.modules.linear.Identity"}, indent=2) + "\n")
    save_file({"linear.weight": dense["weight"].contiguous(), "linear.bias": dense["bias"].contiguous()},
              str(folder / "model.safetensors"))


def _encoder_width(model_dir: Path) -> int | None:
    """The hidden size of the encoder in `model_dir` (its config.json), or None when it cannot be read."""
    from transformers import AutoConfig

    from .families import family_of

    try:
        config = AutoConfig.from_pretrained(model_dir)
        return family_of(config).sizes(config)[1]
    except (OSError, ValueError, UserError):
        return None


def describe_pipeline(path) -> str:
    """e.g. "Transformer -> Pooling (mean) -> Normalize"; a damaged pipeline is one line (UserError)."""
    path = Path(path)
    parts = []
    try:
        for module in _modules(path):
            kind = module["type"].rsplit(".", 1)[-1]
            if kind == "Pooling":
                config_path = path / module.get("path", "") / "config.json"
                config = json.loads(config_path.read_text()) if config_path.is_file() else {}
                kind += f" ({', '.join(pooling_modes(config))})"
            parts.append(kind)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"the sentence-transformers pipeline of {path} is damaged ({type(exc).__name__}: {exc}): "
                        "repair its modules.json and module configs, or pass --no-zeroshot-stsb") from None
    return " -> ".join(parts)


def zeroshot_stsb(model_path, dev, device="cpu", batch_size: int = 64, max_seq_len: int = 128) -> dict:
    """Spearman (and Pearson) x1 of the cosine of the pipeline's embeddings with the gold scores of
    STS-B `dev` (a glue.tasks Split); no training."""
    from scipy.stats import pearsonr, spearmanr
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device=str(device))
    model.max_seq_length = max_seq_len
    a = model.encode(dev.text_a, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    b = model.encode(dev.text_b, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    gold = np.asarray(dev.labels, dtype=np.float64)
    return {"spearman": float(spearmanr(cosine, gold).statistic), "pearson": float(pearsonr(cosine, gold).statistic),
            "dev_examples": len(gold), "split": dev.name, "pipeline": describe_pipeline(model_path)}


# --- the sentence embedding as a distillation target ------------------------------------------------

POOLING_MODES = ("mean", "cls", "max")  # what the sentence term pools like (sentence-transformers' names)


@dataclass(frozen=True)
class SentencePooling:
    """How a teacher turns token states into its sentence embedding, as the sentence term reproduces
    it: the pooling of its pipeline, then Normalize when that follows it directly. A teacher without
    a pipeline pools by mean (the field's default for encoders never trained for it)."""

    mode: str = "mean"
    normalize: bool = False
    source: str = "no sentence-transformers pipeline"

    def describe(self) -> str:
        return f"{self.mode} pooling" + (" -> Normalize" if self.normalize else "") + f" ({self.source})"


def pooling_modes(config: dict) -> list[str]:
    """The pooling modes a Pooling config sets, in sentence-transformers' names: the current format's
    `pooling_mode` (a name or a list of them), or the older `pooling_mode_<x>_token(s): true` keys;
    an old config that sets none pools by mean, as sentence-transformers reads it."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return [mode] if isinstance(mode, str) else list(mode)
    legacy = [k[len("pooling_mode_"):].replace("_tokens", "").replace("_token", "")
              for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    return legacy or ["mean"]


def read_pooling(teacher_dir, head: str | None = None) -> SentencePooling:
    """The SentencePooling of a teacher directory (a plain encoder: mean, unnormalised). The term
    reproduces Transformer -> Pooling [-> Normalize] pipelines; another shape (a Dense after the
    pooling, a module before it), a pipeline fastkd cannot read, or a pooling mode it does not know is
    one line (UserError). head: the GLUE head that reads it (e.g. "--head pipeline"): just the Pooling's
    mode, whatever follows it (the head pools there and ignores the rest), and a refusal names that flag."""
    user, fix = (head, "choose --head mean") if head else ("the sentence term", "set --w-sentence 0")
    if teacher_dir is None or not Path(teacher_dir).is_dir():
        return SentencePooling(source=f"{teacher_dir} is a hub name: its pipeline is not read here; mean")
    if not has_pipeline(teacher_dir):
        return SentencePooling()
    path = Path(teacher_dir)
    try:
        kinds = [(m["type"].rsplit(".", 1)[-1], m.get("path", "")) for m in _modules(path)]
        names = [kind for kind, _ in kinds]
        if "Pooling" not in names:
            return SentencePooling(source=f"{path.name}'s pipeline has no Pooling module; mean")
        config_path = path / kinds[names.index("Pooling")][1] / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        modes = pooling_modes(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"the sentence-transformers pipeline of {path} is damaged ({type(exc).__name__}: {exc}): "
                        f"repair its modules.json and Pooling config, or {fix}") from None
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise UserError(f"{path}: {user} pools as the model's pipeline does, and fastkd knows "
                        f"{', '.join(POOLING_MODES)} pooling, one at a time (the pipeline sets {', '.join(modes)}):"
                        f" {fix}")
    if head:
        return SentencePooling(modes[0], source=f"{path.name}'s pipeline: " + " -> ".join(names))
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UserError(f"{path}: the sentence term reproduces Transformer -> Pooling [-> Normalize] pipelines, and "
                        f"this one is {' -> '.join(names)}: set --w-sentence 0")
    return SentencePooling(modes[0], normalize=names[-1] == "Normalize",
                           source=f"{path.name}'s pipeline: " + " -> ".join(names))


class SentenceProjection(torch.nn.Linear):
    """A narrower student's learned projection of its pooled sentence embedding to the teacher's width,
    computed in float32 as its exported Dense computes it (not in autocast's or DeepSpeed's bf16). Called
    as a module, so ZeRO-3 gathers its partitioned weight around the call."""

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pooled.device.type, enabled=False):
            return torch.nn.functional.linear(pooled.float(), self.weight.float(), self.bias.float())


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor, pooling: SentencePooling,
                       dense: torch.nn.Module | None = None) -> torch.Tensor:
    """(B, D) sentence embeddings of token states `hidden` (B, S, D) over the real tokens of `mask`
    (B, S), pooled and normalised as the teacher's pipeline does (in float32). `dense`: a narrower
    student's learned projection to the teacher's width, applied between the pooling and Normalize,
    where its exported pipeline's Dense module applies it."""
    hidden, real = hidden.float(), mask.unsqueeze(-1).to(torch.float32)
    if pooling.mode == "cls":
        pooled = hidden[:, 0]
    elif pooling.mode == "max":
        pooled = hidden.masked_fill(real == 0, float("-inf")).amax(1)
    else:
        pooled = (hidden * real).sum(1) / real.sum(1).clamp_min(1.0)
    if dense is not None:
        pooled = dense(pooled)
    return torch.nn.functional.normalize(pooled, dim=-1) if pooling.normalize else pooled
