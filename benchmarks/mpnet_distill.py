"""all-mpnet-base-v2 (`--teacher mpnet-base`, 12 layers) compressed to 6 / 4 / 3 layers: the README's
compression table (issue 23, item 5; reported, not asserted).

    python benchmarks/mpnet_distill.py [--layers 6,4,3 --steps 1200 --glue-seeds 2]
    python benchmarks/mpnet_distill.py --layers 3 --steps 1200 --resume   # rows already measured are kept
    python benchmarks/mpnet_distill.py --extra-text sst2,cola,mrpc,rte --steps 2000 --name mpnet_distill_v2
    python benchmarks/mpnet_distill.py --layers 3 --mapping 3=10,11,12 ...   # one more row: other teacher layers
    python benchmarks/mpnet_distill.py --layers "" --mapping 3=1,10,12 --distill-seed 1 ...   # a row's second seed

Per student: `fastkd distill` with its defaults for this teacher (`auto`: the sentence objective on one
sentence per sequence, the teacher labelling the corpus once, its labels kept in the fastkd cache for the
next student) on WikiText-2 test (--extra-text: plus the train-split text of those GLUE tasks, no labels;
STS-B's is left out by default, so the zero-shot judge reads sentences never trained on), the uniform mapping
(teacher-initialised layers), batch 64, lr 1e-4, warmup 0.1 (sentence-transformers' recipe). The
teacher's and each student's zero-shot score comes as soon as it exists (--zero-shot-only stops there);
the GLUE fine-tunes of every model follow, then the speeds. For the teacher and every student:
  - STS-B dev zero-shot: Spearman x 100 of the cosine of the exported pipeline's embeddings
    (sentence-transformers' own encode), and its share of the teacher's;
  - SST-2 and STS-B dev after fastkd glue's fine-tune (the demo's recipe for sentence models, the
    biencoder head, but at lr 1e-4: the demo's 5e-4 collapsed the 768-wide teacher's SST-2 on one
    seed; --glue-steps x 32 on --glue-examples rows), mean over --glue-seeds seeds;
  - parameters, and encoding speed: sentences/s of `SentenceTransformer.encode` over the STS-B
    dev sentences, each once (batch 64, float32, this CPU's threads), after a warm-up, median of
    --speed-repeats; each student is timed beside the teacher in interleaved rounds, so its ratio to
    the teacher compares within one stretch of the machine, whatever machine a row was measured on.
Each student is fine-tuned and timed as soon as it is distilled (unless --zero-shot-only): a student
lives in the fastkd cache, which a new machine does not have, so what is not measured while it exists
costs another distillation. The teacher's fine-tunes come last (the teacher can always be rebuilt).
One distillation seed per student (an hour each on 2 cores) unless --distill-seed adds rows of another
seed ("3 layers (1,10,12) seed 1"): differences between students within about a point are not resolved
by one seed. Each zero-shot score, fine-tune and timing is saved at once; --resume keeps the rows of an
earlier run with the same settings (an interrupted distillation resumes from its last checkpoint while
its folder exists; a row measured in full is kept without its student), so the table can be completed
over several sessions, on other machines too. The distillation minutes of rows from other machines are
each row's own (see machines).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, quiet_logs, table, write_result  # noqa: E402
from distill_step import DEFAULT_CORPUS  # noqa: E402

from fastkd.config import DistillConfig  # noqa: E402
from fastkd.corpus import default_cache_dir  # noqa: E402
from fastkd.distill import run_distill  # noqa: E402
from fastkd.glue.config import FinetuneConfig  # noqa: E402
from fastkd.glue.data import TaskCache
from fastkd.glue.finetune import evaluate
from fastkd.glue.tasks import task_spec  # noqa: E402
from fastkd.models import load_tokenizer, resolve_model_path  # noqa: E402
from fastkd.sentence import zeroshot_stsb  # noqa: E402

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
DECISIVE = ("teacher", "steps", "batch_size", "lr", "warmup", "seq_len", "corpus", "extra_text", "glue_steps",
            "glue_examples",
            "glue_lr", "glue_seq_len", "glue_head")  # what a kept row must share with this run (more --glue-seeds add seeds)


def machine_label(measured_on: dict) -> str:
    """A CPU as the tables name it: its model and widest vector ISA (two AMD EPYC kinds share one name; two
    CPUs alike in both are taken for one machine)."""
    isa = measured_on.get("isa", [])
    width = "AMX" if "amx_bf16" in isa else "AVX-512" if "avx512f" in isa else "AVX2" if "avx2" in isa else "no AVX2"
    return f"{measured_on.get('cpu', 'unknown CPU')} ({width})"


def teacher_speeds(rows: dict[str, dict]) -> dict[str, float]:
    """Per machine, the median of the teacher's sentences/s timed beside the students timed on it (a kept
    student may be timed on a later machine than the one that distilled it: `timed_on`)."""
    by_machine: dict[str, list[float]] = {}
    for name, row in rows.items():
        if name != "teacher" and row.get("teacher_sentences_per_s") is not None:
            where = row.get("timed_on") or row.get("measured_on", {})
            by_machine.setdefault(machine_label(where), []).append(row["teacher_sentences_per_s"])
    return {label: statistics.median(speeds) for label, speeds in by_machine.items()}


def speed_cell(row: dict) -> str:
    """A student's sentences/s and its ratio to the teacher in the same rounds; the teacher's per machine."""
    if row["model"] == "teacher":
        speeds = row.get("sentences_per_s_by_machine") or {}
        return "; ".join(f"{speed:.0f} on {label}" for label, speed in speeds.items()) or "-"
    if row.get("sentences_per_s") is None:
        return "-"
    return f"{row['sentences_per_s']:.0f} ({row['sentences_per_s'] / row['teacher_sentences_per_s']:.1f}x)"


def encoding_speeds(paths: dict[str, Path], sentences: list[str], repeats: int) -> dict[str, float]:
    """Sentences per second of each pipeline's encode over `sentences`: every model warmed up, then
    `repeats` interleaved rounds (one encode of each model per round), the median per model. Interleaving
    spreads any drift in the machine's speed over all models alike."""
    from sentence_transformers import SentenceTransformer

    models = {name: SentenceTransformer(str(path), device="cpu") for name, path in paths.items()}
    for model in models.values():
        model.encode(sentences[:128], batch_size=64, show_progress_bar=False)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.encode(sentences, batch_size=64, show_progress_bar=False)
            times[name].append(time.perf_counter() - t0)
    return {name: len(sentences) / statistics.median(t) for name, t in times.items()}


EXTRA_MIN_WORDS = 5  # SST-2's train rows are treebank phrases down to one word: fragments, not sentences


def corpus_with_extra_text(corpus: str, cache: TaskCache, tasks: list[str], folder: Path) -> str:
    """A corpus folder: the `corpus` files (linked) and one file of the train-split text of the GLUE `tasks`
    (every sentence of EXTRA_MIN_WORDS words or more, once, in file order; no labels, no dev or test text).
    Unlabelled in-domain-ish text a user would have; the default leaves STS-B out, so its zero-shot score
    judges text the student never saw. Written through a temporary file, so a killed run leaves none half."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in ([Path(corpus)] if Path(corpus).is_file() else sorted(Path(corpus).rglob("*.txt"))):
        link = folder / source.name
        if not link.exists():
            link.symlink_to(source.resolve())
    seen: dict[str, None] = {}
    for task in tasks:
        train = cache.data(task_spec(task)).train
        for text in (*train.text_a, *(train.text_b or ())):
            text = " ".join(text.split())
            if len(text.split()) >= EXTRA_MIN_WORDS:
                seen.setdefault(text, None)
    target = folder / f"glue-train-{'-'.join(tasks)}.txt"
    text = "".join(f"{t}\n" for t in seen)
    # Rewritten only when it differs: a rewrite with other text would make a resumed student refuse the
    # corpus and every cache keyed on it (tokens, teacher labels) start over.
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    print(f"corpus {folder}: {corpus} + {len(seen)} train-split texts of {', '.join(tasks)}", flush=True)
    return str(folder)


def labelling(row: dict) -> str:
    if row.get("teacher_labels_s") is None:
        return "-"
    if "read from the labels store" in (row.get("teacher_labels") or ""):
        return "read"
    # (a labelling an interrupted run began counts only its own part: marked, not a whole labelling's minutes)
    return f"{row['teacher_labels_s'] / 60:.0f}" + ("+" if "interrupted run" in (row.get("teacher_labels") or "") else "")


def mean_or_dash(scores: list[float] | None, seeds: int) -> str:
    """A fine-tuned column: the mean of its seeds, saying so where fewer were measured than asked."""
    if not scores:
        return "-"
    return f"{statistics.fmean(scores):.1f}" + ("" if len(scores) >= seeds else f" ({len(scores)} of {seeds} seeds)")


def student_name(layers: int, mapping: str, seed: int) -> tuple[str, str]:
    """A student's row name and its folder under --work: seed 0 keeps the names of the rows published before
    --distill-seed existed, so --resume finds them; another seed is a row (and a student) of its own."""
    name = f"{layers} layers" + ("" if mapping == "uniform" else f" ({mapping})")
    folder = f"{layers}-layers" + ("" if mapping == "uniform" else "-" + mapping.replace(",", "-"))
    if seed:
        name, folder = f"{name} seed {seed}", f"{folder}-seed{seed}"
    return name, folder


def parameters(path) -> int:
    from transformers import AutoModel

    return sum(p.numel() for p in AutoModel.from_pretrained(str(path)).parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="mpnet-base", help="mpnet-base (all-mpnet-base-v2); default for a smoke run")
    p.add_argument("--layers", default="6,4,3", help="student depths, comma-separated (uniform mapping; \"\" for none)")
    p.add_argument("--mapping", action="append", default=[], metavar="LAYERS=MAPPING",
                   help="one more student, as fastkd distill --mapping (the teacher layers its layers start from), "
                        "e.g. 3=10,11,12; repeatable")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--distill-seed", type=int, default=0,
                   help="the distillation's seed (initialisation, data order, sampling); a seed other than 0 adds "
                        "rows of their own, so a row's seeds sit side by side (a row without distill_seed is seed 0)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--seq-len", type=int, default=128, help="the longest sentence kept, in tokens")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--extra-text", default="", help="GLUE tasks whose train-split text (no labels) joins the "
                                                    "corpus, e.g. sst2,cola,mrpc,rte (default: none)")
    p.add_argument("--data-dir", default=str(GLUE))
    p.add_argument("--glue-steps", type=int, default=72)
    p.add_argument("--glue-examples", type=int, default=1920)
    p.add_argument("--glue-lr", type=float, default=1e-4,
                   help="(the demo's 5e-4 is sized for 384-wide MiniLM students: on this 768-wide teacher it "
                        "collapsed SST-2 to the majority class on 1 of 2 seeds, 50.9 and 71.2)")
    p.add_argument("--glue-seq-len", type=int, default=64)
    p.add_argument("--glue-seeds", type=int, default=2)
    p.add_argument("--glue-head", default="biencoder", help="as fastkd glue's --head")
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--zero-shot-only", action="store_true",
                   help="distil and score zero-shot STS-B, then stop (the fine-tunes and speeds follow with --resume)")
    p.add_argument("--resume", action="store_true", help="keep the rows of results/NAME.json with the same settings")
    p.add_argument("--name", default="mpnet_distill", help="results/NAME.json")
    p.add_argument("--work", default=None, help="where the students are kept (default: the fastkd cache's "
                                                "bench/NAME); the speed pass and --resume read them there")
    args = p.parse_args()
    for extra in args.mapping:  # checked now, not after the teacher's zero-shot
        layers, sep, mapping = extra.partition("=")
        if not (sep and layers.isdigit() and mapping):
            p.error(f"--mapping {extra}: give LAYERS=MAPPING, e.g. 3=10,11,12")
    quiet_logs()
    logging.getLogger("fastkd").setLevel(logging.WARNING)
    started = time.perf_counter()
    settings = vars(args)
    rows: dict[str, dict] = {}
    machines = [machine()]
    if args.resume and (RESULTS / f"{args.name}.json").is_file():
        earlier = json.loads((RESULTS / f"{args.name}.json").read_text())
        # (a setting added after the earlier run has its default there)
        differ = [k for k in DECISIVE if earlier.get("settings", {}).get(k, p.get_default(k)) != settings[k]]
        if differ:
            raise SystemExit(f"--resume: results/{args.name}.json differs in {', '.join(differ)}; choose another --name")
        rows = {r["model"]: r for r in earlier.get("rows", [])}
        machines = [m for m in earlier.get("machines", [earlier.get("machine")]) if m and m != machine()] + machines
    cache = TaskCache(args.data_dir)
    dev = cache.data(task_spec("stsb")).dev[0]
    sentences = list(dict.fromkeys(s for pair in zip(dev.text_a, dev.text_b) for s in pair))
    teacher = resolve_model_path(args.teacher)
    work = Path(args.work) if args.work else default_cache_dir() / "bench" / args.name
    corpus = args.corpus
    if args.extra_text:
        corpus = corpus_with_extra_text(args.corpus, cache, args.extra_text.split(","), work / "corpus")

    def zero_shot(name: str, path, extra: dict) -> None:
        # (the teacher is rebuilt the same on any machine: its row, fine-tunes included, is always kept)
        if (name in rows and rows[name].get("stsb_zeroshot") is not None
                and (name == "teacher" or Path(rows[name]["path"]).exists())):
            return
        zero = 100 * zeroshot_stsb(path, dev, max_seq_len=args.seq_len)["spearman"]
        rows[name] = {"model": name, **extra, "path": str(path), "measured_on": {k: machine()[k] for k in ("cpu", "cores", "isa")},
                      "parameters": parameters(path), "stsb_zeroshot": zero, "glue": {}}
        print(json.dumps(rows[name]), flush=True)
        save()

    def measured(name: str) -> bool:
        """Whether a row holds everything this run asks of it (its student may be gone since)."""
        row = rows.get(name)
        if row is None or row.get("stsb_zeroshot") is None:
            return False
        if args.zero_shot_only:
            return True
        return (all(len(row["glue"].get(task, [])) >= args.glue_seeds for task in ("sst2", "stsb"))
                and (name == "teacher" or row.get("teacher_sentences_per_s") is not None))

    def timed_beside_teacher(name: str) -> None:
        """The student's encoding speed and the teacher's, timed in the same interleaved rounds."""
        speeds = encoding_speeds({"teacher": teacher, name: Path(rows[name]["path"])}, sentences, args.speed_repeats)
        rows[name]["sentences_per_s"] = speeds[name]
        rows[name]["teacher_sentences_per_s"] = speeds["teacher"]
        rows[name]["timed_on"] = {k: machine()[k] for k in ("cpu", "cores", "isa")}
        print(f"{name}: {speeds[name]:.0f} sentences/s, teacher {speeds['teacher']:.0f} in the same rounds", flush=True)
        save()

    def fine_tuned(name: str) -> None:
        """Every (task, seed) fine-tune of one model not yet in its row, each saved as it finishes (a 12-layer
        fine-tune takes about 15 minutes here)."""
        row = rows[name]
        for task in ("sst2", "stsb"):
            scores = row["glue"].setdefault(task, [])
            for seed in range(len(scores), args.glue_seeds):
                cfg = FinetuneConfig(max_steps=args.glue_steps, max_train_examples=args.glue_examples, lr=args.glue_lr,
                                     max_seq_len=args.glue_seq_len, seed=seed, progress=False, head=args.glue_head)
                result = evaluate(row["path"], load_tokenizer(row["path"], "model"), [task_spec(task)], cache, cfg)
                scores.append(100 * next(iter(result.values())).score)
                print(f"{name} {task} seed {seed}: {scores[-1]:.2f}", flush=True)
                save()

    def save(final: bool = False) -> Path:
        if "teacher" in rows:
            # the teacher's own row: per machine, the median of its timings beside the students timed there (a
            # table completed on several machines has no one teacher speed; each student's ratio is to the
            # teacher in its own rounds, so on its own machine)
            rows["teacher"]["sentences_per_s_by_machine"] = teacher_speeds(rows)
            for stale in ("sentences_per_s", "teacher_sentences_per_s"):  # (one median over machines, before)
                rows["teacher"].pop(stale, None)
        return write_result(args.name, {
            "machine": machine(), "machines": machines, "settings": settings, "complete": final,
            "judges": "STS-B dev zero-shot Spearman x100 (pipeline encode); SST-2 accuracy and STS-B Spearman x100 "
                      "on dev after fastkd glue's fine-tune (glue: task -> one score per seed); encode sentences/s "
                      "on STS-B dev",
            "rows": list(rows.values()), "minutes": round((time.perf_counter() - started) / 60, 1)})

    # Zero-shot STS-B (the targets) for every model first, the GLUE fine-tunes (an hour for the teacher
    # alone) after: a table completed over several sessions has its headline numbers early.
    zero_shot("teacher", teacher, {"layers": None})
    rows["teacher"]["path"] = str(teacher)  # (a kept row may name another machine's cache)
    students = [(int(x), "uniform") for x in args.layers.split(",") if x]  # --layers "": only --mapping rows
    students += [(int(layers), mapping) for layers, _, mapping in (m.partition("=") for m in args.mapping)]
    for layers, mapping in students:
        name, folder = student_name(layers, mapping, args.distill_seed)
        if measured(name):
            continue
        output = work / folder
        student = output / "student"
        if not (student / "fastkd.json").is_file():  # an interrupted distillation resumes from its checkpoint
            if rows.pop(name, None) is not None:  # what an earlier row holds was measured on an earlier student
                print(f"{name}: its earlier student is gone; this row is measured again on a new one", flush=True)
            cfg = DistillConfig(output=str(output), corpus=corpus, teacher=args.teacher, student_layers=layers,
                                mapping=mapping,
                                max_seq_len=args.seq_len, max_steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, warmup=args.warmup, seed=args.distill_seed, progress=False,
                                resume=output.exists(),
                                checkpoint_every=max(1, args.steps // 6), log_every=max(1, args.steps // 20))
            student = run_distill(cfg)
        info = json.loads((student / "fastkd.json").read_text())
        zero_shot(name, student, {"layers": layers, "mapping": info["mapping"], "distill_seed": args.distill_seed,
                                  "objective": info["objective"],
                                  "corpus_mode": info["corpus"]["mode"], "steps": info["steps"],
                                  "distill_s": info["seconds"], "teacher_labels_s": info.get("teacher_labels_s"),
                                  "teacher_labels": info.get("teacher_labels")})
        if not args.zero_shot_only:
            fine_tuned(name)
            if rows[name].get("teacher_sentences_per_s") is None:
                timed_beside_teacher(name)
    if args.zero_shot_only:
        print(f"zero-shot rows saved in results/{args.name}.json; rerun with --resume for the fine-tunes")
        return
    fine_tuned("teacher")
    ref = rows["teacher"]
    # (rows kept from an earlier run whose student is gone may lack their fine-tunes and timings: shown as "-")
    unmeasured = [n for n in rows if not measured(n)]  # rows kept without their students may still lack columns
    save(final=not unmeasured)
    shown = [{"model": r["model"], "mapping": r.get("mapping") or "-", "parameters": f"{r['parameters'] / 1e6:.1f}M",
              "STS-B zero-shot": f"{r['stsb_zeroshot']:.2f} ({100 * r['stsb_zeroshot'] / ref['stsb_zeroshot']:.1f}%)",
              "SST-2 fine-tuned": mean_or_dash(r["glue"].get("sst2"), args.glue_seeds),
              "STS-B fine-tuned": mean_or_dash(r["glue"].get("stsb"), args.glue_seeds),
              # each student's ratio is to the teacher timed in the same rounds
              "sentences/s": speed_cell(r),
              "distill min": "-" if r.get("distill_s") is None else f"{r['distill_s'] / 60:.0f}",
              # the teacher labels the corpus once for every student (fastkd's label store): its minutes
              # are the first student's, the others read them
              "labelling min": labelling(r)}
             for r in rows.values()]
    print(table(shown, list(shown[0])))
    if unmeasured:
        print(f"not complete: {', '.join(unmeasured)} lack fine-tunes or timings (their students are gone: "
              "--mapping LAYERS=MAPPING with --resume distils them again)")


if __name__ == "__main__":
    main()
