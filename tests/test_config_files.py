"""--config FILE: JSON or YAML settings under the command-line flags, one line for a bad file, and the
resolved config each run writes read back to the same settings."""

import json

import pytest
import yaml

from fastkd.cli import main, parse_config
from fastkd.options import resolved_config, to_dict

COMMANDS = {
    "distill": ["--output", "o", "--corpus", "c.txt", "--teacher", "t", "--student-layers", "2", "--mapping", "2,-",
                "--batch-size", "8", "--lr", "1e-3", "--bf16", "--no-progress", "--report-to", "tensorboard",
                "--seed", "7", "--corpus-sample", "0.5", "--deepspeed", "ds.json"],
    "search": ["--output", "o", "--corpus", "c.txt", "--data-dir", "glue", "--proxy-steps", "7", "--proxy-seq-len",
               "32", "--proxy-tasks", "SST-2,rte", "--proxy-finetune-batch-size", "4", "--verdict-seeds", "11,",
               "--proxy-chunk", "2", "--monotone", "--no-progress"],
    "glue": ["--model", "a", "--model", "b", "--tasks", "rte,mrpc", "--data-dir", "glue", "--output", "o",
             "--max-steps", "5", "--lr", "1e-4", "--skip-bad-rows", "--bf16"],
    "demo": ["--data-dir", "d", "--quick", "--student-layers", "2", "--seed", "3"],
    "bench": ["--backends", "torch,CPP", "--seq-len", "64", "--steps", "3", "--output", "b.json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_resolved_config_reads_back_to_the_same_settings(tmp_path, command):
    _, cfg = parse_config([command, *COMMANDS[command]])
    _, defaults = parse_config([command, *_required(command)])
    assert cfg != defaults  # the flags above changed something, so the round trip below can fail
    written = tmp_path / f"{command}-config.json"
    written.write_text(json.dumps(resolved_config(command, cfg)))
    assert parse_config([command, "--config", str(written)]) == (command, cfg)
    as_yaml = tmp_path / "settings.yaml"  # a hand-written YAML file of the same settings
    as_yaml.write_text(yaml.safe_dump(to_dict(cfg)))
    assert parse_config([command, "--config", str(as_yaml)])[1] == cfg


def _required(command):
    return {"distill": ["--output", "o", "--corpus", "c"], "search": ["--output", "o", "--corpus", "c", "--data-dir", "g"],
            "glue": ["--model", "a", "--tasks", "rte", "--data-dir", "g", "--output", "o"]}.get(command, [])


def test_flags_on_the_command_line_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output: runs/x\ncorpus: c.txt\nbatch-size: 8\nbf16: true\nlr: 0.002\n")
    _, cfg = parse_config(["distill", "--config", str(path), "--batch-size", "4", "--no-bf16"])
    assert (cfg.batch_size, cfg.bf16, cfg.lr, cfg.output) == (4, False, 0.002, "runs/x")
    search = tmp_path / "search.yaml"
    search.write_text("output: o\ncorpus: c\ndata_dir: g\nproxy:\n  steps: 3\n  tasks: [mrpc, RTE]\nproxy_lr: 0.01\n")
    _, cfg = parse_config(["search", "--config", str(search), "--proxy-steps", "5"])
    assert (cfg.proxy.steps, cfg.proxy.tasks, cfg.proxy.lr) == (5, ("mrpc", "rte"), 0.01)


def test_repeated_flags_replace_the_files_list_and_flag_names_work_as_keys(tmp_path, capfd):
    path = tmp_path / "glue.yaml"
    path.write_text("model: [a, b]\ntasks: rte\ndata-dir: g\noutput: o\n")
    assert parse_config(["glue", "--config", str(path)])[1].model == ["a", "b"]
    assert parse_config(["glue", "--config", str(path), "--model", "c"])[1].model == ["c"]  # not a, b, c
    assert parse_config(["glue", "--config", str(path), "--model", "c", "--model", "d"])[1].model == ["c", "d"]
    search = tmp_path / "search.yaml"  # the flags' names for settings whose field is named otherwise
    search.write_text("output: o\ncorpus: c\ndata_dir: g\nproxy_seq_len: 48\nproxy_chunk: 2\n"
                      "proxy_finetune_batch_size: 4\n")
    _, cfg = parse_config(["search", "--config", str(search)])
    assert (cfg.proxy.max_seq_len, cfg.chunk, cfg.proxy.finetune_batch) == (48, 2, 4)
    search.write_text("output: o\ncorpus: c\ndata_dir: g\nproxy_seq_len: 48\nproxy: {max_seq_len: 32}\n")
    assert main(["search", "--config", str(search)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "proxy_max_seq_len is given twice" in err[0], err


def test_a_distill_run_reruns_from_its_own_config_json(tmp_path, tiny_teacher_dir, small_corpus, capfd):
    first = tmp_path / "first"
    argv = ["distill", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus), "--student-layers", "2",
            "--mapping", "last", "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "32", "--lr", "1e-3",
            "--no-progress"]
    assert main([*argv, "--output", str(first)]) == 0, capfd.readouterr().err
    second = tmp_path / "second"
    assert main(["distill", "--config", str(first / "config.json"), "--output", str(second)]) == 0
    a, b = (json.loads((d / "config.json").read_text())["config"] for d in (first, second))
    assert a.pop("output") != b.pop("output") and a == b and a["lr"] == 1e-3


@pytest.mark.parametrize("content, suffix, message", [
    ('{"batch_size": 8, "bacth_size": 4}', ".json", "unknown setting 'bacth_size' for fastkd distill (did you mean batch_size?)"),
    ('{"batch_size": "eight"}', ".json", "batch_size: invalid literal for int()"),
    ('{"batch_size": 2.5}', ".json", "batch_size must be an integer (got 2.5)"),
    ('{"bf16": "yes"}', ".json", "bf16 must be true or false (got 'yes')"),
    ('{"lr": null}', ".json", "lr may not be null"),
    ('{"init": "zeros"}', ".json", "init must be one of teacher, random (got 'zeros')"),
    ('{"seed": -1}', ".json", "seed: invalid seed -1: give an integer from 0 to 4294967295"),
    ('{"batch_size": 8,', ".json", "not valid JSON"),
    ('{"batch-size": 8, "batch_size": 4}', ".json", "batch_size is given twice"),
    ("batch_size: [1, 2", ".yaml", "not valid YAML"),
    ("[1, 2]", ".yaml", "must hold a mapping of settings"),
    ('{"fastkd_version": "0", "command": "search", "config": {"population": 4}}', ".json",
     "is the resolved config of a fastkd search run: give it to `fastkd search --config`"),
    ("{}", ".json", "--output, --corpus are required: give them on the command line or in --config FILE"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capfd, content, suffix, message):
    path = tmp_path / f"settings{suffix}"
    path.write_text(content)
    extra = [] if "required" in message else ["--output", str(tmp_path / "o"), "--corpus", "c.txt"]
    code = main(["distill", "--config", str(path), *extra])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("fastkd distill: error: "), err
    assert message in err[0], err[0]


def test_a_missing_config_file_is_one_line(tmp_path, capfd):
    assert main(["glue", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"fastkd glue: error: --config {tmp_path / 'nope.yaml'}: no such file"]
