"""The run directory: one wording for every command's resume refusals, and RunDir's steps in order."""

import pytest

from fastkd.errors import UserError
from fastkd.rundir import RunDir, end_of_command, other_run_refusal


def test_a_saved_run_is_continued_only_by_resume_with_the_same_settings(tmp_path):
    saved = {"lr": 1e-4, "steps": 10, "progress": True}
    assert other_run_refusal(tmp_path, saved, dict(saved), resume=True) is None
    # A setting that does not change what is computed may differ.
    assert other_run_refusal(tmp_path, saved, {**saved, "progress": False}, True, frozenset({"progress"})) is None
    again = other_run_refusal(tmp_path, saved, dict(saved), resume=False, holds="a distill run")
    assert again == (f"--output {tmp_path} holds a distill run already: pass --resume to continue it, or choose "
                     "another --output")
    other = other_run_refusal(tmp_path, saved, {**saved, "lr": 5e-4}, resume=False, holds="a distill run")
    assert "holds a distill run with other settings: lr (saved 0.0001, now 0.0005)" in other and "--resume" in other
    changed = other_run_refusal(tmp_path, saved, {**saved, "lr": 5e-4, "steps": 20}, resume=True)
    assert changed.startswith(f"cannot --resume {tmp_path}: settings differ from the saved run: lr (saved 0.0001, "
                              "now 0.0005); steps (saved 10, now 20)")
    assert other_run_refusal(tmp_path, saved, {**saved, "progress": False}, True) is not None  # not ignored


def test_run_dir_refuses_foreign_and_unwritable_folders_then_claims_and_writes_its_config(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine\n")
    with pytest.raises(UserError, match="holds files that are not a fastkd glue run"):
        RunDir(foreign, "glue").refuse_unusable()
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match="is a file"):
        RunDir(a_file, "glue").refuse_unusable()
    run = RunDir(tmp_path / "run", "glue")
    assert run.refuse_unusable() == tmp_path / "run"
    run.claim()
    try:
        path = run.write_config({"lr": 1e-4})
        assert path == tmp_path / "run" / "glue-config.json" and path.read_text().strip().startswith("{")
        with pytest.raises(UserError, match="holds GLUE results with other settings"):
            run.refuse_other_run({"lr": 1e-4}, {"lr": 2e-4}, resume=False, holds="GLUE results")
        run.refuse_other_run(None, {"lr": 2e-4}, resume=False)  # nothing saved: nothing to refuse
    finally:
        end_of_command(failed=False)  # the lock released, as the CLI does after a command
