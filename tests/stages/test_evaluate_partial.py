"""`spp eval good broken`: the good model's result survives the broken one's failure (results.json marked
partial, exit with the failure's code), and the rerun evaluates only what is missing."""

import json
import shutil

from conftest import run_spp
from tiny_models import save_random_model

TASK = ["--tasks", "ppl:builtin:python-docs:test", "--seqlen", "64", "--limit", "2"]


def test_a_model_failing_to_load_keeps_the_finished_models_results(tmp_path, random_model_dir, capsys):
    broken = save_random_model(tmp_path / "broken", intermediate_size=64)  # weights of another shape ...
    shutil.copy(random_model_dir / "config.json", broken / "config.json")  # ... under a valid config: preflight passes
    out = tmp_path / "results.json"
    capsys.readouterr()
    code, _, err = run_spp(["eval", random_model_dir, broken, *TASK, "--out", out], capsys)
    assert code == 3 and err.strip().splitlines()[-1].startswith("spp: error: RuntimeError: ")
    assert f"kept in {out}, marked partial (model {broken} did not finish)" in err
    stored = json.loads(out.read_text())
    assert stored["partial"] is True and list(stored["models"]) == [str(random_model_dir)]
    assert stored["failure"]["model"] == str(broken) and stored["failure"]["error"].startswith("RuntimeError: ")
    value = stored["models"][str(random_model_dir)]["perplexity"]["ppl:builtin:python-docs:test"]["value"]

    # the rerun keeps the finished model (not evaluated again) and fails the same way
    code, _, err = run_spp(["eval", random_model_dir, broken, *TASK, "--out", out], capsys)
    assert code == 3 and f"model 1/2 {random_model_dir}: kept from the partial results" in err

    # with the broken model repaired, the rerun completes the file: no longer partial
    shutil.rmtree(broken)
    save_random_model(broken, seed=1)
    capsys.readouterr()
    code, _, err = run_spp(["eval", random_model_dir, broken, *TASK, "--out", out, "--format", "json"], capsys)
    assert code == 0, err
    stored = json.loads(out.read_text())
    assert "partial" not in stored and "failure" not in stored and list(stored["models"]) == [str(random_model_dir),
                                                                                              str(broken)]
    assert stored["models"][str(random_model_dir)]["perplexity"]["ppl:builtin:python-docs:test"]["value"] == value


def test_a_failing_first_model_writes_nothing(tmp_path, random_model_dir, capsys):
    broken = save_random_model(tmp_path / "broken", intermediate_size=64)
    shutil.copy(random_model_dir / "config.json", broken / "config.json")
    out = tmp_path / "results.json"
    code, _, _ = run_spp(["eval", broken, random_model_dir, *TASK, "--out", out], capsys)
    assert code == 3 and not out.exists()


def test_ctrl_c_during_a_later_model_keeps_the_finished_ones_and_exits_130(tmp_path, random_model_dir, capsys,
                                                                           monkeypatch):
    from spp_cli.stages import evaluate

    second = save_random_model(tmp_path / "second", seed=1)
    evaluate_one = evaluate.evaluate_one

    def interrupted_on_the_second(path, *args, **kwargs):
        if path == str(second):
            raise KeyboardInterrupt
        return evaluate_one(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_one", interrupted_on_the_second)
    out = tmp_path / "results.json"
    code, _, err = run_spp(["eval", random_model_dir, second, *TASK, "--out", out], capsys)
    assert code == 130 and err.endswith("spp: interrupted: rerun the same command to resume\n")
    stored = json.loads(out.read_text())
    assert stored["partial"] is True and list(stored["models"]) == [str(random_model_dir)]
    assert stored["failure"] == {"model": str(second), "path": str(second), "error": "interrupted"}
