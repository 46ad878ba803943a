"""Building a distillation under DeepSpeed ZeRO: `fastkd distill ... --deepspeed CONFIG.json`.

Started by the deepspeed launcher (one node or many), by torchrun, or as one plain process. This
module checks the ds_config against the flags, joins the process group and builds every rank's
ZeroEngine (fastkd.training.zero: its step, checkpoint format and export); the run itself (resume,
loop, export) is fastkd.distill's, the same as for one process. Against one process:

- the student and its projection layers are one module wrapped by `deepspeed.initialize`, so ZeRO
  shards optimizer states (stage 1), gradients (2) and parameters (3); the teacher stays outside the
  engine, frozen, one inference copy per rank (bf16/fp16 on GPUs);
- every rank reads its own slice of each global batch from the same deterministic stream (global
  batch = micro-batch x accumulation x world size, checked against the ds_config).

The loss, its terms and the gradients mean the same as with one process: DeepSpeed averages the
ranks' gradients, and the logged terms are averaged over ranks.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
from pathlib import Path

import torch

from .. import optim
from ..config import DistillConfig
from ..corpus import BatchStream, load_corpus, sample_corpus
from .setup import Run, build_models, check_memory, prepare_output, resolve
from ..errors import UserError
from ..ops.dropout import use_fast_dropout
from ..rundir import lock_output
from ..rng import seed_everything
from ..teacher import Teacher
from ..training.zero import DistillModule, ZeroEngine, on_rank0, zero_stage

log = logging.getLogger(__name__)

# --- the ds_config against the flags ------------------------------------------------------------

def _check(config: dict, key: str, wanted, flag: str, path: str) -> None:
    value = config.get(key, "auto")
    if value == "auto":
        config[key] = wanted
    elif value != wanted:
        raise UserError(f"--deepspeed {path}: {key} is {value!r} but the flags give {wanted!r} ({flag}): "
                        f"make them agree, or set it to \"auto\"")


def load_ds_config(path: str, cfg: DistillConfig, world: int, hidden: int) -> dict:
    """The ds_config with every "auto" filled from the flags; a disagreement is one line (exit 2).

    `hidden` is the student's width: "auto" bucket sizes follow it (the Hugging Face convention:
    reduce bucket hidden^2, ZeRO-3 prefetch 0.9 hidden^2, parameters under 10 hidden elements kept
    whole), so a small student is not handed buckets sized for billions of parameters."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--deepspeed {path}: no such file (see launch/ for ready configs)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--deepspeed {path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed {path}: the file must hold a JSON object")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    _check(config, "train_micro_batch_size_per_gpu", cfg.batch_size, "--batch-size", path)
    _check(config, "gradient_accumulation_steps", cfg.grad_accum, "--grad-accum", path)
    _check(config, "train_batch_size", global_batch,
           f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} ranks", path)
    _check(config, "gradient_clipping", cfg.clip_grad, "--clip-grad", path)
    for half in ("bf16", "fp16"):
        section = config.setdefault(half, {})
        if section.get("enabled") == "auto":
            section["enabled"] = cfg.bf16 if half == "bf16" else False
    if config["bf16"].get("enabled") and not cfg.bf16:
        raise UserError(f"--deepspeed {path}: bf16 is enabled in the config: pass --bf16 (or disable it there)")
    if cfg.bf16 and not config["bf16"].get("enabled"):
        if config["fp16"].get("enabled"):
            raise UserError(f"--deepspeed {path}: fp16 is enabled in the config but --bf16 was passed: choose one")
        config["bf16"]["enabled"] = True
    if config["fp16"].get("enabled") and not torch.cuda.is_available():
        raise UserError(f"--deepspeed {path}: fp16 training needs a GPU; use bf16 or fp32 on a CPU")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"--deepspeed {path}: zero_optimization must be a JSON object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise UserError(f"--deepspeed {path}: zero_optimization.stage is {stage!r}; ZeRO stages are 0, 1, 2 and 3")
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", cfg.lr), ("weight_decay", cfg.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    scheduler = config.get("scheduler")
    if scheduler is not None:
        params = scheduler.setdefault("params", {})
        for key, value in (("total_num_steps", cfg.max_steps), ("warmup_num_steps", int(cfg.warmup * cfg.max_steps)),
                           ("warmup_max_lr", cfg.lr), ("warmup_min_lr", 0.0)):
            if params.get(key) == "auto":
                params[key] = value
    config.setdefault("steps_per_print", 10 ** 9)  # fastkd logs its own metrics
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW as the client optimizer
    config.setdefault("wall_clock_breakdown", False)
    return config


# --- processes ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank), starting the process group; one plain process becomes a world of 1."""
    if "RANK" not in os.environ:  # no launcher: a single-rank world on this machine
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        # Ranks on one CPU share its cores: one thread pool each would oversubscribe it.
        local_world = local_ranks(world)
        # The cores this process may use (a cgroup/affinity-limited job sees fewer than os.cpu_count()).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(local_world, 1)))
    if not torch.cuda.is_available():
        _skip_inference_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        _unlink_shm_buffers(rank)
    return rank, world, local_rank


def local_ranks(world: int) -> int:
    """The ranks on this node: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))


def ranks_sharing_memory(world: int) -> int:
    """How many ranks hold their step in the same memory: all of this node's on a CPU (one RAM); on
    GPUs each rank is taken to have its own (a launcher that shows each rank one GPU, as Slurm's
    --gpus-per-task does, would make a count by device_count() wrong by the number of ranks)."""
    return 1 if torch.cuda.is_available() else local_ranks(world)


def _skip_inference_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when its process group starts
    (30-45 s on 2 cores, once per machine) and maps a 66 MiB /dev/shm buffer per rank for it. Only its
    inference all-reduce (tensor-parallel inference) calls that op; a ZeRO training step's collectives
    go through torch.distributed (gloo). Not built, that all-reduce falls back to torch's. A DeepSpeed
    without this hook builds the op as before, and its buffers are still unlinked below."""
    # (by its full name: `from deepspeed.comm import torch` would give the torch package that
    # deepspeed.comm imports under that name)
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(ds_comm, "build_shm_op", None)):
        ds_comm.build_shm_op = lambda: None


def _unlink_shm_buffers(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (ranks on one host) maps a 66 MiB /dev/shm buffer per rank and never
    unlinks it: every job, killed or not, would leave them in RAM until a reboot (hundreds of test
    runs filled a 24 GiB machine). Once every rank has initialised, every rank has mapped every
    buffer, so the names can go; the memory stays mapped until the ranks exit, then it is freed."""
    torch.distributed.barrier()  # every rank has opened every other rank's buffer
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"  # shm.cpp's naming
    try:
        os.unlink(Path("/dev/shm") / name)
    except OSError:
        pass  # not created (ranks on several hosts, no shm op) or not on Linux


# --- the run ------------------------------------------------------------------------------------------

def _teacher_dtype(config: dict) -> torch.dtype | None:
    if not torch.cuda.is_available():
        return None  # CPU: the teacher runs in float32 (or under bf16 autocast with --bf16)
    if config["fp16"].get("enabled"):
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_zero_run(cfg: DistillConfig) -> Run:
    """Every rank: check the config, join the process group, build the engine, the teacher and the stream."""
    teacher_config, shape, mapping = resolve(cfg)
    # Checked before any process group exists: a bad config is one line on every rank, not a hang.
    if cfg.device != "auto":
        raise UserError("--device does not apply with --deepspeed: each rank takes its own GPU (LOCAL_RANK), or the CPU")
    ds_config = load_ds_config(cfg.deepspeed, cfg, int(os.environ.get("WORLD_SIZE", "1")), shape.hidden)
    output, _ = prepare_output(cfg)  # read-only, so every rank checks and refuses alike (no rank left waiting)
    rank, world, _ = init_distributed()
    import deepspeed

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # Rank 0 judges whether each rank's micro-batch fits, for every rank (the same verdict everywhere,
    # though each reads the free memory at its own moment), before the lock and any weights.
    on_rank0(rank, lambda: check_memory(cfg, teacher_config, shape, mapping, device, ranks_sharing_memory(world),
                                        partitions=world))
    on_rank0(rank, lambda: lock_output(output, "distill"))  # rank 0 holds the lock; a refusal is every rank's
    seed_everything(cfg.seed)

    tokenizer, teacher_model, student, criterion = build_models(cfg, shape, mapping)
    half = _teacher_dtype(ds_config)
    teacher_model = teacher_model.to(device=device, dtype=half) if half is not None else teacher_model.to(device)
    teacher = Teacher.serving(teacher_model, [criterion], cfg.bf16 and half is None)

    use_fast_dropout(student)  # before DeepSpeed hooks the modules (ZeroEngine's own call then changes nothing)
    module = DistillModule(student, criterion)
    client_optimizer, client_scheduler = None, None
    if "optimizer" not in ds_config:  # the same AdamW as single-process distillation (DeepSpeed steps it)
        client_optimizer = optim.adamw([student, criterion], cfg.lr, cfg.weight_decay)
    if "scheduler" not in ds_config:  # linear warmup then linear decay, as single-process
        def client_scheduler(optimizer):
            return optim.warmup_then_linear(optimizer, cfg.warmup, cfg.max_steps)
    params = None if client_optimizer is not None else optim.param_groups([student, criterion], cfg.weight_decay)
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=client_optimizer, model_parameters=params,
                                              lr_scheduler=client_scheduler, config=ds_config)

    # Rank 0 tokenizes and caches the corpus first; the others read the cache. A bad corpus is rank 0's
    # finding, passed to every rank so all of them stop with the same line instead of waiting.
    def corpus_of_this_run():
        return load_corpus(cfg.corpus, tokenizer, cfg.max_seq_len, cfg.cache_dir, cfg.num_proc, cfg.progress,
                           cfg.corpus_mode)

    corpus = on_rank0(rank, corpus_of_this_run)
    if rank != 0:
        corpus = corpus_of_this_run()
    corpus = sample_corpus(corpus, cfg.corpus_sample, cfg.seed)
    stream = BatchStream(corpus, cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    engine = ZeroEngine(cfg.train_config(), ds_engine, teacher, stream, world, rank, ds_config)
    resolved = {"deepspeed": {"world_size": world, "zero_stage": zero_stage(ds_config), "config": ds_config}}
    return Run(cfg, engine, tokenizer, mapping, shape, len(corpus), output, resolved)


