"""The truth benchmark's statistics (benchmarks/proxy_vs_final.py: the mapping effect, rank correlations,
the searches' claims checked against the final table) and the measured fidelity a search report cites
(fastkd.search.measured): numbers a user reads to decide whether the search's verdict means anything."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import proxy_vs_final as pvf  # noqa: E402

from fastkd.search import measured  # noqa: E402
from fastkd.search.config import ProxyConfig  # noqa: E402

MAPPINGS = ["2,4,6", "4,5,6", "1,2,3", "1,3,5"]


def test_the_mapping_effect_is_the_two_way_anova_a_least_squares_fit_gives():
    rng = np.random.default_rng(3)
    scores = rng.normal(80, 1, (5, 3)) + np.array([[0.0], [1.5], [-2.0], [0.3], [0.8]])
    e = pvf.mapping_effect(scores)
    # the same test from a linear model with mapping and seed dummies: residual and reduced (seed-only) fits
    m, s = scores.shape
    y = scores.ravel()
    seed_cols = np.kron(np.ones((m, 1)), np.eye(s))
    map_cols = np.kron(np.eye(m), np.ones((s, 1)))[:, 1:]
    full, reduced = np.hstack([seed_cols, map_cols]), seed_cols
    rss = [float(((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2).sum()) for x in (full, reduced)]
    df_res = m * s - full.shape[1]
    f = ((rss[1] - rss[0]) / (m - 1)) / (rss[0] / df_res)
    assert e["df"] == [m - 1, df_res]
    assert e["F"] == pytest.approx(f)
    assert e["p"] == pytest.approx(stats.f.sf(f, m - 1, df_res))
    assert e["residual_sd"] == pytest.approx(np.sqrt(rss[0] / df_res))
    assert e["spread"] == pytest.approx(np.ptp(scores.mean(1)))


def test_rank_correlation_is_of_the_mapping_means_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    final = rng.normal(0, 1, (10, 3)) + np.arange(10)[:, None]
    proxy = final[:, :2] * 0.5 + rng.normal(0, 0.1, (10, 2))  # ranks nearly as the final does
    r = pvf.bootstrap_rank(proxy, final, np.random.default_rng(1))
    assert r["spearman"]["point"] == pytest.approx(stats.spearmanr(proxy.mean(1), final.mean(1)).statistic)
    assert r["kendall"]["point"] == pytest.approx(stats.kendalltau(proxy.mean(1), final.mean(1)).statistic)
    assert r["spearman"]["point"] > 0.9 and 0.5 < r["spearman"]["low"] <= r["spearman"]["high"] <= 1
    unrelated = pvf.bootstrap_rank(rng.normal(0, 1, (10, 2)), final, np.random.default_rng(1))
    assert unrelated["spearman"]["low"] < 0 < unrelated["spearman"]["high"]
    tied = pvf.bootstrap_rank(np.full((10, 2), 54.55), final, np.random.default_rng(1))  # ranks nothing, every draw
    assert tied["spearman"] == {"point": 0.0, "low": 0.0, "high": 0.0} and tied["spearman_one_seed"]["point"] == 0.0


def _final_table(means: dict[str, list[float]]) -> dict:
    return {m: {str(s): {"finetuned": v, "zeroshot": v} for s, v in enumerate(vals)} for m, vals in means.items()}


def _search(folder: Path, winner: str, verdicts: dict) -> str:
    folder.mkdir()
    (folder / "best_mapping.json").write_text(json.dumps({"text": winner, "teacher_layers": 6, "verdicts": {
        name: {"mapping": ref, "n": 3, "mean": mean, "sd": 0.01, "half_width": hw}
        for name, (ref, mean, hw) in verdicts.items()}}))
    return str(folder)


def test_a_searchs_claims_are_confirmed_contradicted_or_bounded_by_the_final_table(tmp_path):
    final = _final_table({"2,4,6": [80.0, 80.2, 79.9], "4,5,6": [81.0, 81.3, 81.1], "1,2,3": [78.0, 78.4, 78.1],
                          "1,3,5": [80.1, 80.0, 80.2]})
    beats = _search(tmp_path / "a", "4,5,6", {"uniform": ("2,4,6", 0.01, 0.005), "last": ("4,5,6", 0.0, None)})
    wrong = _search(tmp_path / "b", "1,2,3", {"uniform": ("2,4,6", 0.02, 0.01)})
    keep = _search(tmp_path / "c", "1,3,5", {"uniform": ("2,4,6", 0.0, 0.005)})  # within ±0.5 points
    absent = _search(tmp_path / "d", "3,4,6", {"uniform": ("2,4,6", 0.02, 0.01)})
    args = argparse.Namespace(searches=",".join([beats, wrong, keep, absent]), teacher="default")
    rows = pvf.check_verdicts(args, {"final": final}, 6)
    by = {(r["search"], r["reference"].split()[0]): r for r in rows}
    assert by[(beats, "uniform")]["agrees"] == "yes, confirmed"
    assert by[(beats, "last")]["claim"] == "no claim"
    assert by[(wrong, "uniform")]["agrees"] == "no, contradicted"
    # uniform is 1.1 below the best final mapping, more than the ±0.5 the keep allowed
    assert by[(keep, "uniform")]["agrees"].startswith("no: the best final mapping (4,5,6) is 1.10 above")
    assert "add 3,4,6 to --mappings" in by[(absent, "uniform")]["final (95% t)"]


def test_a_search_of_another_teacher_is_refused_in_one_line(tmp_path):
    folder = _search(tmp_path / "a", "4,5,6", {"uniform": ("2,4,6", 0.01, 0.005)})
    data = json.loads((Path(folder) / "best_mapping.json").read_text())
    (Path(folder) / "best_mapping.json").write_text(json.dumps({**data, "teacher_layers": 12}))
    final = _final_table({m: [80.0, 80.5] for m in MAPPINGS[:2]})
    with pytest.raises(SystemExit, match="12-layer teacher"):
        pvf.check_verdicts(argparse.Namespace(searches=folder, teacher="default"), {"final": final}, 6)


SEARCH = {"teacher": "default", "student": "3 layers, hidden 384, 12 heads, FFN 1536", "corpus": "wiki.train.raw",
          "corpus_mode": "packed", "tasks": ["sst2", "mrpc", "rte"]}


def _measured(config: dict | None = None) -> dict:
    interval = {"point": 0.62, "low": 0.1, "high": 0.9}
    return {"schema": measured.SCHEMA, "benchmark": "benchmarks/proxy_vs_final.py", "published": "2026-12-08",
            "machines": ["AMD EPYC (2 cores; avx2)"], "teacher": "default", "student": SEARCH["student"],
            "corpus": "wiki.train.raw", "mappings": MAPPINGS,
            "final": {"objective": "sentence", "steps": 400, "batch": 64, "lr": 1e-4, "warmup": 0.1,
                      "judge_tasks": "sst2,stsb,mrpc", "judge_steps": 72, "seeds": [0, 1, 2]},
            "mapping_effect": {"finetuned": {"F": 3.1, "df": [3, 6], "p": 0.11, "residual_sd": 0.4, "spread": 1.2}},
            "proxies": {"tinybert": {
                "config": config or ProxyConfig().as_dict(), "seeds": [0, 1, 2], "corpus_mode": "packed",
                "machine": "AMD EPYC (avx2, fma, avx512f)",
                "distill_seconds": 30.0,
                "measures": {"zeroshot": {"finetuned": {"spearman": interval, "kendall": interval,
                                                        "spearman_one_seed": {**interval, "point": 0.4}},
                                          "zeroshot": {"spearman": interval, "kendall": interval,
                                                       "spearman_one_seed": interval}, "seconds": 2.5},
                             "full": {"finetuned": {"spearman": {**interval, "point": -0.2}, "kendall": interval,
                                                    "spearman_one_seed": {"point": float("nan"), "low": float("nan"),
                                                                          "high": float("nan")}},
                                      "seconds": 40.0},
                             "short": {"tied": {"distinct": 1, "mappings": 4}, "seconds": 3.4}}}}}


def test_a_report_cites_the_measured_fidelity_of_the_rungs_it_ran():
    lines = measured.cite(SEARCH, ProxyConfig(), ["zeroshot", "probe", "full"], _measured())
    text = "\n".join(lines)
    assert "| zeroshot | yes | +0.40 [+0.10, +0.90] | +0.62 [+0.10, +0.90] | +0.62 [+0.10, +0.90] | +0.62 | 2.5 |" in lines
    assert "| full | yes | - | -0.20 [+0.10, +0.90] | - | +0.62 | 40.0 |" in lines
    assert "| probe | yes | not measured | - | - | - | - |" in lines  # a rung it ran that was not measured
    assert "| short |  | ties: 1 distinct scores over 4 mappings, ranks nothing | - | - | - | 3.4 |" in lines
    assert "proxy students on AMD EPYC (avx2, fma, avx512f)" in text and "lr 0.0001, warmup 0.1" in text
    assert "published 2026-12-08" in text and "AMD EPYC" in text and "4 fixed mappings" in text
    assert "30.0 s per mapping and seed" in text
    assert "spread over 1.20 points; one run's noise is 0.40, a 3-seed mean's 0.23" in text
    assert "not told apart from noise" in text  # p = 0.11
    assert "matches the measured teacher, student, corpus, objective and proxy budget" in text


def test_a_report_names_where_its_search_differs_from_what_was_measured():
    proxy = replace(ProxyConfig(), steps=60, bf16=True)  # bf16 autocast changes the fitness too (docs/search.md)
    search = {**SEARCH, "teacher": "mpnet-base", "student": "4 layers, hidden 768, 12 heads, FFN 3072",
              "corpus": "my.txt", "tasks": ["sst2"]}
    text = "\n".join(measured.cite(search, proxy, ["zeroshot"], _measured()))
    for phrase in ("teacher mpnet-base (measured: default)", "student 4 layers", "corpus my.txt (measured: wiki.train.raw)",
                   "proxy steps 60 (measured: 100)", "proxy bf16 True (measured: False)",
                   "tasks scored sst2 (measured: sst2, mrpc, rte)", "not a measurement of it"):
        assert phrase in text
    assert "proxy lr" not in text


def test_the_demo_budget_as_the_benchmark_stores_it_differs_from_a_default_search_by_its_budget_only():
    from fastkd.demo import BUDGETS

    demo = replace(BUDGETS["full"].proxy, objective="tinybert")
    text = "\n".join(measured.cite({**SEARCH, "tasks": ["sst2"]}, demo, ["zeroshot", "full"], _measured(demo.as_dict())))
    assert "matches the measured" in text
    text = "\n".join(measured.cite(SEARCH, ProxyConfig(), ["zeroshot", "full"], _measured(demo.as_dict())))
    differ = text.split("differs from the measured setting in: ")[1]
    assert "proxy steps 100 (measured: 30)" in differ and "proxy tasks" in differ and "teacher" not in differ


def test_a_report_says_the_fidelity_is_unknown_where_nothing_was_measured(tmp_path, caplog, monkeypatch):
    other = replace(ProxyConfig(), objective="minilmv2")
    assert "not of this search's objective minilmv2" in "\n".join(measured.cite(SEARCH, other, ["full"], _measured()))
    monkeypatch.setattr(measured, "MEASURED", tmp_path / "absent.json")
    assert "No measurement ships" in "\n".join(measured.cite(SEARCH, ProxyConfig(), ["full"]))
    broken = tmp_path / "measured_fidelity.json"
    broken.write_text('{"benchmark": ')
    with caplog.at_level(logging.WARNING):
        assert measured.load(broken) is None
    assert "cannot be read" in caplog.text
    broken.write_text(json.dumps({**_measured(), "schema": 0}))
    assert measured.load(broken) is None and "another layout" in caplog.text
    incomplete = _measured()
    del incomplete["proxies"]["tinybert"]["config"]
    text = "\n".join(measured.cite(SEARCH, ProxyConfig(), ["full"], incomplete))
    assert "is incomplete (KeyError" in text


def test_publish_writes_what_a_report_then_cites(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "MEASURED", tmp_path / "measured_fidelity.json")
    rng = np.random.default_rng(0)
    final = {m: {str(s): {"finetuned": 80 + i + rng.normal(0, 0.3), "zeroshot": 84 - i + rng.normal(0, 0.3),
                          "tasks": {"sst2": 81.0}, "objective": "sentence"} for s in range(2)} for i, m in enumerate(MAPPINGS)}
    probe = {"0": [1.0, 2.0, 3.0, 4.0], "1": [4.0, 1.0, 3.0, 2.0]}  # one seed ranks as the final does, one does not
    config = ProxyConfig().as_dict()
    proxy = {"tinybert": {"config": config, "distill_seconds": {"0": 30.0, "1": 32.0, "2": 37.0},
                          "machine": {"cpu": "AMD EPYC", "isa": ["avx2"]},
                          "seconds": {"zeroshot": {m: {"0": 2.0, "1": 3.0} for m in MAPPINGS}},
                          "fitness": {"zeroshot": {m: {str(s): 50 + i + 0.1 * s for s in range(3)}
                                                   for i, m in enumerate(MAPPINGS)},
                                      "short": {m: {"0": 54.55, "1": 54.55} for m in MAPPINGS},
                                      "probe": {m: {s: v[i] for s, v in probe.items()} for i, m in enumerate(MAPPINGS)}}}}
    results = {"final": final, "proxy": proxy, "machines": [{"cpu": "AMD EPYC", "cores": 2, "isa": ["avx2"]}]}
    args = argparse.Namespace(mappings=MAPPINGS, teacher="default", corpus="wiki.train.raw", final_objective="auto",
                              final_steps=400, final_batch=64, final_lr=1e-4, final_warmup=0.1, judge_tasks="sst2,stsb,mrpc",
                              judge_steps=72, publish=True)
    pvf.report(args, results)
    shipped = measured.load()
    zs = shipped["proxies"]["tinybert"]["measures"]["zeroshot"]
    assert zs["finetuned"]["spearman"]["point"] == pytest.approx(1.0)
    assert zs["finetuned"]["spearman_one_seed"]["point"] == pytest.approx(1.0)
    assert zs["zeroshot"]["spearman"]["point"] == pytest.approx(-1.0)
    assert zs["seconds"] == pytest.approx(2.5)
    # the proxy ran 3 seeds, the final table has 2: the 2 ranked are the ones named
    assert shipped["final"]["seeds"] == [0, 1] and shipped["proxies"]["tinybert"]["seeds"] == [0, 1]
    assert shipped["proxies"]["tinybert"]["distill_seconds"] == pytest.approx(31.0)  # (seed 2 is not ranked)
    assert shipped["proxies"]["tinybert"]["measures"]["short"]["tied"] == {"distinct": 1, "mappings": 4}
    means = np.array([np.mean([final[m][s]["finetuned"] for s in ("0", "1")]) for m in MAPPINGS])
    one = np.mean([stats.spearmanr(v, means).statistic for v in probe.values()])
    got = shipped["proxies"]["tinybert"]["measures"]["probe"]["finetuned"]
    assert got["spearman_one_seed"]["point"] == pytest.approx(one) and one != pytest.approx(got["spearman"]["point"])
    search = {**SEARCH, "student": shipped["student"]}
    text = "\n".join(measured.cite(search, ProxyConfig(), ["zeroshot", "full"]))
    assert "| zeroshot | yes | +1.00 [" in text and "AMD EPYC (2 cores; avx2)" in text
    assert "matches the measured teacher" in text


def test_publish_refuses_a_table_too_small_to_rank():
    final = {m: {"0": {"finetuned": 80.0, "zeroshot": 84.0, "tasks": {}}} for m in MAPPINGS}
    args = argparse.Namespace(mappings=MAPPINGS, publish=True)
    with pytest.raises(SystemExit, match="nothing published"):
        pvf.report(args, {"final": final, "proxy": {}, "machines": []})


def test_a_corpus_is_named_alike_by_the_benchmark_and_a_search(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_text("x")
    (tmp_path / "corpus" / "a.txt").write_text("x")
    assert measured.corpus_name(str(tmp_path / "corpus")) == "corpus/ (a.txt, b.txt)"
    assert measured.corpus_name(str(tmp_path / "corpus" / "a.txt")) == "a.txt"
    assert measured.corpus_name("wikitext") == "wikitext"  # a hub dataset
