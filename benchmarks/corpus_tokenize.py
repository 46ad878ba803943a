"""Corpus tokenization: tokens/s and peak memory at 1 and 2 processes on a >= 200 MB corpus (and, as
before --num-proc, one process with the tokenizer's threads off), and one 50 MB line (the case that
used to peak at 7.3 GiB).

The corpus is real text made large by repetition: the WikiText-2 test split, concatenated N times
(about 200 MB). Each measurement runs in a fresh process with an empty cache; peak memory is the
largest sum of PSS over the process and its tokenizing workers, sampled every 100 ms. The 50 MB line
is measured through `load_corpus` (pieces of PIECE_CHARS characters), and one tokenizer call on a
whole line, what fastkd did before, on a 10 MB line (at 50 MB it outgrows this machine).

    python benchmarks/corpus_tokenize.py            # writes benchmarks/results/corpus_tokenize.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "corpus" / "wikitext-2-raw-test.txt"


def _memory(process) -> int:
    """Proportional set size (shared pages split between the processes sharing them: forked workers
    share the parent's libraries), else RSS."""
    try:
        return process.memory_full_info().pss
    except AttributeError:
        return process.memory_info().rss


class PeakRSS:
    """The largest memory of this process plus its children (PSS, so a forked worker's shared pages
    are not counted twice), sampled in a thread."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.process, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def _sample(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                total = _memory(self.process)
                for child in self.process.children(recursive=True):
                    try:
                        total += _memory(child)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(args) -> None:
    import contextlib

    from fastkd.corpus import build, load_corpus
    from fastkd.models import load_tokenizer

    if args.no_threads:  # as before --num-proc: one process, the tokenizer's threads off (the CLI's default)
        import os

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        build._tokenizer_threads = lambda enabled: contextlib.nullcontext()

    tokenizer = load_tokenizer("default")
    with PeakRSS() as rss:
        started = time.perf_counter()
        if args.single_call:
            text = Path(args.corpus).read_text(encoding="utf-8")
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            sequences = None
        else:
            ds = load_corpus(args.corpus, tokenizer, args.seq_len, args.cache, num_proc=args.num_proc)
            sequences = len(ds)
            tokens = sum(int(b["attention_mask"].sum()) for b in ds.with_format("numpy").iter(batch_size=10000))
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": round(seconds, 1), "sequences": sequences, "tokens": tokens,
                      "tokens_per_s": round(tokens / seconds), "peak_memory_mib": round(rss.peak / 2 ** 20)}))


def measure(corpus: Path, cache: Path, num_proc: int | None, seq_len: int, single_call: bool = False,
            no_threads: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--corpus", str(corpus), "--cache", str(cache),
           "--seq-len", str(seq_len)] + (["--no-threads"] if no_threads else [])
    if num_proc is not None:
        cmd += ["--num-proc", str(num_proc)]
    if single_call:
        cmd.append("--single-call")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--single-call", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-threads", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--num-proc", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence")
    p.add_argument("--megabytes", type=int, default=200, help="size of the repeated corpus")
    p.add_argument("--line-megabytes", type=int, default=50, help="size of the single line")
    p.add_argument("--procs", default="1,2", help="numbers of tokenizing processes to compare")
    p.add_argument("--call-megabytes", type=int, default=10, help="line size for the one-call comparison")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    text = WIKITEXT.read_text(encoding="utf-8")
    results = {"machine": machine(), "seq_len": args.seq_len, "corpus": {}, "single_line": {}}
    with tempfile.TemporaryDirectory(prefix="fastkd-tokenize-") as tmp:
        tmp = Path(tmp)
        repeats = -(-args.megabytes * 2 ** 20 // len(text.encode()))
        corpus = tmp / "repeated.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for _ in range(repeats):
                f.write(text)
        results["corpus"]["source"] = f"{WIKITEXT.name} x {repeats}"
        results["corpus"]["megabytes"] = round(corpus.stat().st_size / 2 ** 20, 1)
        row = measure(corpus, tmp / "cache-before", 1, args.seq_len, no_threads=True)
        results["corpus"]["before_one_thread"] = row
        print(f"{results['corpus']['megabytes']} MB, 1 process, tokenizer threads off (before): {row}", flush=True)
        for n in [int(x) for x in args.procs.split(",")]:
            row = measure(corpus, tmp / f"cache-{n}", n, args.seq_len)
            results["corpus"][f"num_proc_{n}"] = row
            print(f"{results['corpus']['megabytes']} MB, {n} process(es): {row}", flush=True)
        corpus.unlink()

        flat = " ".join(line.strip() for line in text.splitlines() if line.strip())
        line = tmp / "one-line.txt"
        with open(line, "w", encoding="utf-8") as f:
            written = 0
            while written < args.line_megabytes * 2 ** 20:
                f.write(flat + " ")
                written += len(flat) + 1
            f.write("\n")
        results["single_line"]["megabytes"] = round(line.stat().st_size / 2 ** 20, 1)
        results["single_line"]["load_corpus"] = measure(line, tmp / "cache-line", 1, args.seq_len)
        print(f"one {results['single_line']['megabytes']} MB line, load_corpus: {results['single_line']['load_corpus']}",
              flush=True)
        # One call on the whole line grows with it (about 2 GiB per 10 MB here, past what this machine
        # holds at 50 MB): measured on a shorter line of the same text.
        short = tmp / "short-line.txt"
        short.write_text(line.read_text(encoding="utf-8")[:args.call_megabytes * 2 ** 20].rsplit(" ", 1)[0] + "\n",
                         encoding="utf-8")
        results["single_line"]["one_tokenizer_call"] = {"megabytes": round(short.stat().st_size / 2 ** 20, 1),
                                                        **measure(short, tmp / "cache-call", 1, args.seq_len,
                                                                  single_call=True)}
        print(f"one tokenizer call on a {args.call_megabytes} MB line (before): "
              f"{results['single_line']['one_tokenizer_call']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "corpus_tokenize.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
