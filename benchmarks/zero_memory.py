"""Per-rank memory of ZeRO stages 0-3 on 2 ranks, and distillation throughput per rank vs one process.

For each stage, a 2-rank job (`deepspeed --num_gpus 2`, DS_ACCELERATOR=cpu on a CPU) builds the real
distillation engine (fastkd.distill.zero), runs a few steps, and after the backward of the last one counts
every live tensor of the rank once (by storage): the student's parameters (their ZeRO-3 partitions),
ZeRO's fp32 master slice of them, the optimizer states (Adam's moments), and the rest that training
keeps: gradients and communication buckets. The teacher's copy is reported apart. Then the peak of one whole step
(activations and transient buffers included) over the level before it, and the median time of a few
steps. The same steps in one plain process (no DeepSpeed, all cores) give the single-process
throughput; on a CPU the ranks split the cores, so per-rank throughput is about 1/ranks of it.

    python benchmarks/zero_memory.py [--teacher default --student-layers 3 --batch-size 8 --seq-len 128 --steps 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus"


def _census(run) -> dict:
    """Bytes of this rank's live tensors by role, each storage counted once."""
    import torch

    d = run.engine
    seen: set[int] = set()

    def storages(tensors) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            if s.data_ptr() in seen or s.nbytes() == 0:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
        return total

    teacher = storages(list(d.teacher.model.parameters()) + list(d.teacher.model.buffers()))
    params = storages([getattr(p, "ds_tensor", p) for p in d.ds_engine.module.parameters()])
    opt = d.ds_engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    states = storages([v for state in inner.state.values() for v in state.values()])
    # ZeRO keeps each rank's slice of the weights in fp32 for the optimizer (stage 1/2 and 3 names).
    master = storages(list(getattr(opt, "single_partition_of_fp32_groups", []) or [])
                      + list(getattr(opt, "fp32_partitioned_groups_flat", []) or []))
    rest = storages([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
    mib = lambda b: round(b / 2 ** 20, 2)  # noqa: E731
    return {"params_mib": mib(params), "fp32_master_mib": mib(master), "optimizer_states_mib": mib(states),
            "grads_and_buffers_mib": mib(rest), "teacher_mib": mib(teacher),
            "total_mib": mib(params + master + states + rest)}


def worker(args) -> None:
    """Inside the launcher: one rank's census and step times, one JSON file per rank."""
    import torch

    from fastkd.config import DistillConfig
    from fastkd.distill import build_run

    cfg = DistillConfig(output=args.output, corpus=args.corpus, teacher=args.teacher, student_layers=args.student_layers,
                        max_seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps + 2,
                        progress=False, deepspeed=args.config, objective="tinybert", corpus_mode="packed")
    run = build_run(cfg)
    d = run.engine
    engine = d.ds_engine
    d.train_step()  # optimizer states exist from here on
    # One more step by hand, counted after its backward: parameters, gradients and states all alive.
    batch = {k: v.to(d.device) for k, v in d.stream.next().items()}
    loss, _ = engine(batch["input_ids"], batch["attention_mask"], d.teacher(batch["input_ids"], batch["attention_mask"]))
    engine.backward(loss)
    census = _census(run)
    engine.step()
    from fastkd.bench import PeakMemory

    with PeakMemory(d.device) as memory:  # one whole step: the state above plus activations and transients
        d.train_step()
    census["step_peak_extra_mib"] = round(memory.extra_mib, 1)
    times = []
    for _ in range(args.steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        d.train_step()
        times.append(time.perf_counter() - t0)
    times.sort()
    # One file per rank: the ranks' stdout interleaves.
    result = Path(args.output).parent / f"result-rank{d.rank}.json"
    result.write_text(json.dumps({"rank": d.rank, **census, "step_s": times[len(times) // 2]}))


def single_process(args) -> float:
    """Median step time of the single-process LocalEngine at the same per-rank micro-batch."""
    import statistics

    from fastkd.config import DistillConfig
    from fastkd.distill import build_run

    with tempfile.TemporaryDirectory() as out:
        run = build_run(DistillConfig(output=out, corpus=args.corpus, teacher=args.teacher,
                                      student_layers=args.student_layers, max_seq_len=args.seq_len,
                                      batch_size=args.batch_size, max_steps=args.steps + 2, progress=False,
                                      objective="tinybert", corpus_mode="packed"))
        run.engine.train_step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            run.engine.train_step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="default")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks)),
                    "MALLOC_MMAP_THRESHOLD_": "131072"})  # the RSS follows live tensors (see loss_kernels.py)
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    rows = []
    for stage in map(int, args.stages.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            # The shipped configs (launch/ds/), so the numbers are what a user runs; stage 0 = plain
            # data parallelism with the same settings.
            shipped = json.loads((REPO / "launch" / "ds" / f"zero{max(stage, 1)}.json").read_text())
            if stage == 0:
                shipped["zero_optimization"] = {"stage": 0}
            config = Path(tmp) / f"zero{stage}.json"
            config.write_text(json.dumps(shipped))
            cmd = [deepspeed, "--num_gpus", str(args.ranks), __file__, "--worker", "--config", str(config),
                   "--output", str(Path(tmp) / "run"), "--teacher", args.teacher, "--corpus", args.corpus,
                   "--student-layers", str(args.student_layers), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("result-rank*.json"))]
            if out.returncode != 0 or len(results) != args.ranks:
                raise SystemExit(f"stage {stage} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        r0 = sorted(results, key=lambda r: r["rank"])[0]
        rows.append({"stage": stage, **{k: v for k, v in r0.items() if k != "rank"}})
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        for key in ("params_mib", "optimizer_states_mib", "grads_and_buffers_mib", "total_mib"):
            r[key.replace("_mib", "_vs_stage0")] = round(r[key] / base[key], 3) if base[key] else None
    single = single_process(args)
    for r in rows:
        r["seq_per_s_per_rank"] = round(args.batch_size / r["step_s"], 2)
        r["per_rank_vs_single_process"] = round(single / r["step_s"], 3)
        r["all_ranks_vs_single_process"] = round(args.ranks * single / r["step_s"], 3)
    columns = ["stage", "params_mib", "fp32_master_mib", "optimizer_states_mib", "grads_and_buffers_mib", "total_mib", "params_vs_stage0",
               "optimizer_states_vs_stage0", "grads_and_buffers_vs_stage0", "total_vs_stage0", "teacher_mib",
               "step_peak_extra_mib", "step_s", "seq_per_s_per_rank", "per_rank_vs_single_process",
               "all_ranks_vs_single_process"]
    print(table(rows, columns))
    print(f"single process: {single:.3f} s per step ({args.batch_size / single:.2f} sequences/s)")
    path = write_result("zero_memory", {"ranks": args.ranks, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                        "student_layers": args.student_layers, "teacher": args.teacher, "rows": rows,
                                        "single_process_step_s": single})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
