"""`fastkd bench`: distillation-step throughput of each loss backend, measured side by side.

What a user runs on their own hardware before a long distillation: for one teacher, student shape,
mapping, batch and sequence length, whole optimizer steps (teacher forward, student forward, losses,
backward, AdamW) are timed after a warm-up, for every loss backend present, with fresh and identical
students. Ratios are taken against the `torch` reference measured in the same process. Peak memory is
the allocator's peak on a GPU; on a CPU, the resident-set high-water mark above the level at the
start of the measurement (freed heap memory is returned to the OS first, so each backend starts even).
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import ops
from .config import BenchConfig
from .device import pick_device
from .training import LocalEngine, TrainConfig
from .errors import UserError
from .losses import DistillLoss, objective_weights, sentence_pooling
from .mapping import parse_mapping
from .memory import check_step_fits, step_memory
from .options import resolved_config
from .families import compile_refusal, usable_positions
from .models import build_student, load_config, load_teacher, load_tokenizer, student_shape
from .teacher import Teacher

log = logging.getLogger(__name__)


# --- memory ---------------------------------------------------------------------------------

def trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field_name: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


class PeakMemory:
    """Extra bytes at the peak of a block, in MiB, over the level at its start."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            trim_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark (Linux)
            except OSError:
                pass
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.extra_mib = max(0.0, (peak - self.start) / 2 ** 20)
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the measurement ------------------------------------------------------------------------

def present_backends(requested: list[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The backends to measure (torch first: the reference; auto last, a row of its own: what distill would
    run) and why the others are missing."""
    wanted = [*ops.BACKENDS, "auto"] if "all" in requested else list(dict.fromkeys(["torch"] + requested))
    wanted = [b for b in wanted if b != "auto"] + (["auto"] if "auto" in wanted else [])
    present, missing = [], {}
    for name in wanted:
        if name == "auto":
            present.append(name)
            continue
        if name == "triton" and device.type != "cuda":
            missing[name] = "Triton kernels need a GPU (TRITON_INTERPRET=1 runs them on a CPU, for tests only)"
            continue
        why = ops.unavailable(name, device)
        if why is None:
            present.append(name)
        else:
            missing[name] = why
    return present, missing


def _batch(tokenizer, cfg: BenchConfig, device: torch.device) -> dict:
    # Token values do not change the cost; every position is a real token (the worst case for the losses).
    gen = torch.Generator().manual_seed(cfg.seed)
    low = min(1000, tokenizer.vocab_size // 2)  # past the special and unused tokens of BERT vocabularies
    ids = torch.randint(low, tokenizer.vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def measure_backend(backend: str, teacher_model, tokenizer, cfg: BenchConfig, device: torch.device) -> dict:
    shape = student_shape(teacher_model.config, cfg.student_layers, cfg.student_hidden, cfg.student_heads,
                          cfg.student_ffn)
    mapping = parse_mapping(cfg.mapping, shape.layers, teacher_model.config.num_hidden_layers)
    train = TrainConfig(max_steps=cfg.steps + cfg.warmup, batch_size=cfg.batch_size, bf16=cfg.bf16,
                        compile=cfg.compile, progress=False,
                        max_seq_len=cfg.seq_len)
    torch.manual_seed(cfg.seed)
    weights = objective_weights(cfg.objective, attention_kl=cfg.w_attention_kl)
    criterion = DistillLoss.for_teacher(mapping, shape.hidden, teacher_model, weights, backend,
                                        cfg.relation_heads).to(device)
    student = build_student(teacher_model, shape, "teacher", mapping, seed=cfg.seed).to(device)
    teacher = Teacher.serving(teacher_model, [criterion], cfg.bf16)
    engine = LocalEngine(train, teacher, student, criterion, stream=None)
    engine.prepare_losses()  # each op self-checked, and under auto timed on this batch's shapes, as distill does
    batch = _batch(tokenizer, cfg, device)

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        engine.train_step([(batch, teacher(batch["input_ids"], batch["attention_mask"]))])
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(cfg.warmup):
        step()
    with PeakMemory(device) as memory:
        times = [step() for _ in range(cfg.steps)]
    profile = profile_steps(step, cfg.profile, device) if cfg.profile else None
    engine.read()  # the steps' numbers, read once (a run reads them at logging steps)
    # What each op really ran on (after its self-check): a row is labelled with it, not only with the
    # backend asked for, so a fallback never passes for a measurement of that backend.
    ran_on: dict[str, str] = {}
    for entry in criterion.ran_on():
        ran_on[entry["op"]] = "/".join(sorted({*ran_on.get(entry["op"], "").split("/"), entry["backend"]} - {""}))
    median = statistics.median(times)
    seqs = cfg.batch_size
    return {"backend": backend, "seq_per_s": round(seqs / median, 2), "tokens_per_s": round(seqs * cfg.seq_len / median, 1),
            "step_s": round(median, 4), "step_s_stdev": round(statistics.pstdev(times), 4),
            "peak_extra_mib": round(memory.extra_mib, 1), "student": shape.describe(), "mapping": mapping.text,
            "ran_on": ran_on, "fell_back": backend != "auto" and any(b != backend for b in ran_on.values()),
            **({"profile": profile} if profile is not None else {}),
            **({"timings_ms": {f"{s['op']} {s['dtype']}": s["timings_ms"] for s in criterion.selections()
                               if s["timings_ms"]}}
               if backend == "auto" else {})}


PROFILE_TOP = 15  # ops listed per profiled row


def profile_steps(step, steps: int, device: torch.device) -> list[dict]:
    """`steps` more calls of `step` under torch.profiler: the ops with the most self time (CPU, or the GPU's
    where there is one), each with its milliseconds per step and share of the profiled time, the most first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key, "ms_per_step": round(getattr(e, attr) / 1000 / steps, 2),
             "share": round(getattr(e, attr) / total, 4), "calls_per_step": round(e.count / steps, 1)}
            for e in events[:PROFILE_TOP]]


def environment(device: torch.device) -> dict:
    """The machine (fastkd.machine: CPU, its kernel-deciding flags, torch build, library versions)
    and the device the numbers were taken on."""
    from .machine import describe

    info = describe()
    info.update({"device": device.type, "torch": torch.__version__, "transformers": info["versions"]["transformers"],
                 "threads": torch.get_num_threads(), "triton": info["versions"]["triton"]})
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def check_before_loading(cfg: BenchConfig, teacher_config, device: torch.device) -> None:
    """Refuse before the teacher is loaded: a step that cannot fit the machine (fastkd.memory; one
    backend's step is alive at a time, so that is the peak), a sentence term it cannot run."""
    shape = student_shape(teacher_config, cfg.student_layers, cfg.student_hidden, cfg.student_heads, cfg.student_ffn)
    mapping = parse_mapping(cfg.mapping, shape.layers, teacher_config.num_hidden_layers)
    weights = objective_weights(cfg.objective, attention_kl=cfg.w_attention_kl)
    sentence_pooling(cfg.teacher, weights)
    memory = step_memory(teacher_config, shape, len(mapping.pairs()), cfg.seq_len, weights, bf16=cfg.bf16,
                         relation_heads=cfg.relation_heads)
    check_step_fits(memory, cfg.batch_size, cfg.seq_len, device, seq_flag="--seq-len", what="a bench step")


def run_bench(cfg: BenchConfig) -> dict:
    cfg.validate()
    device = pick_device(cfg.device)
    teacher_config = load_config(cfg.teacher, "teacher")
    limit = usable_positions(teacher_config)
    if cfg.seq_len > limit:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the {limit} tokens the teacher's position embeddings take")
    check_before_loading(cfg, teacher_config, device)
    if cfg.compile and (refusal := compile_refusal(device, teacher_config)) is not None:
        raise UserError(refusal)
    present, missing = present_backends(cfg.backends, device)
    for name, why in missing.items():
        log.info("backend %s not measured: %s", name, why)
    tokenizer = load_tokenizer(cfg.teacher)
    teacher_model = load_teacher(cfg.teacher).to(device)
    rows = [measure_backend(b, teacher_model, tokenizer, cfg, device) for b in present]
    reference = next((r for r in rows if r["backend"] == "torch"), None)
    for r in rows:
        if reference is not None:
            r["speedup_vs_torch"] = round(reference["step_s"] / r["step_s"], 3)
            r["memory_vs_torch"] = round(r["peak_extra_mib"] / reference["peak_extra_mib"], 3) \
                if reference["peak_extra_mib"] > 0 else None
    # fastkd_version/command/config: the form --config reads, so `fastkd bench --config bench.json` reruns it.
    return {**resolved_config("bench", cfg), "settings": asdict(cfg), "environment": environment(device), "rows": rows,
            "missing": missing}


COLUMNS = ["backend", "seq_per_s", "tokens_per_s", "step_s", "peak_extra_mib", "speedup_vs_torch", "memory_vs_torch"]


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = ["" if r.get(c) is None else str(r[c]) for c in COLUMNS]
        if r.get("fell_back") or r["backend"] == "auto":  # say what really ran (what auto picked)
            cells[0] += " (ran: " + ", ".join(f"{op} on {b}" for op, b in r["ran_on"].items()) + ")"
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("profile"):
            lines += ["", f"profile of {r['backend']} (self time per step):", profile_table(r["profile"])]
    return "\n".join(lines)


def profile_table(profile: list[dict]) -> str:
    lines = ["| op | ms/step | share | calls/step |", "|---|---|---|---|"]
    lines += [f"| {p['op']} | {p['ms_per_step']} | {100 * p['share']:.1f}% | {p['calls_per_step']} |" for p in profile]
    return "\n".join(lines)
