"""Ctrl-C, as real SIGINTs in real `spp` processes: a run is either done (exit 0) or interrupted (exit 130, one
line), never both, and never a traceback (spp_cli/interrupts.py).

Each child runs the console script's main() with one hook that sends SIGINT to the process itself at the moment
under test: as the result is printed, in an atexit handler, in the interpreter's teardown, in a finalizer."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

SEND_SIGINT = "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.3)"  # the handler runs during the sleep

HOOKS = {
    # the result is printed, then Ctrl-C (a prune's "pruned ... -> out" line, then exit 130 was the report)
    "as the result is printed": f"""
        import spp_cli.render as render
        def render_then_interrupt(console, result, original=render.render_env):
            original(console, result)
            {SEND_SIGINT}
        render.render_env = render_then_interrupt
    """,
    # "Exception ignored in atexit callback ... KeyboardInterrupt", exit 0 (spp eval)
    "in an atexit handler": f"""
        import atexit
        def at_exit():
            {SEND_SIGINT}
        atexit.register(at_exit)
    """,
    # the teardown resets SIGINT to its default: a finished run was killed by it (-2; 130 in a shell)
    "in the interpreter's teardown": """
        class Teardown:
            # the module's globals are gone by then: what __del__ needs comes in as defaults
            def __del__(self, kill=os.kill, pid=os.getpid(), sigint=signal.SIGINT, sleep=time.sleep):
                kill(pid, sigint)
                sleep(0.3)
        sys.modules["__main__"].teardown = Teardown()
    """,
}


def run_spp_child(hook: str, argv: list[str]) -> subprocess.CompletedProcess:
    script = "import os, signal, sys, time\n" + textwrap.dedent(hook) + textwrap.dedent(f"""
        sys.argv = ["spp", *{argv!r}]
        from spp_cli.cli import main
        main()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # start_new_session: the child's SIGINT is not tied to this test's terminal; Python's default handler is set
    # explicitly, as an interactive shell leaves it (a shell's background job would start with SIGINT ignored)
    script = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + script
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60, start_new_session=True)


@pytest.mark.parametrize("moment", list(HOOKS))
def test_a_ctrl_c_after_the_result_is_printed_leaves_the_run_done(moment):
    result = run_spp_child(HOOKS[moment], ["env"])
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "transformers" in result.stdout  # the result, printed whole
    assert result.stderr == "", result.stderr  # no "interrupted", no "Exception ignored", no traceback


def test_a_ctrl_c_swallowed_by_a_finalizer_still_interrupts_the_run():
    """A SIGINT that lands in a `__del__` (torch's teardown of a model, ...) is not lost with a traceback."""
    hook = f"""
        import spp_cli.environment as environment
        class Finalized:
            def __del__(self):
                {SEND_SIGINT}
        def report_with_a_finalizer(original=environment.environment_report):
            Finalized()  # collected at once: Ctrl-C arrives inside its __del__
            time.sleep(0.3)
            return original()
        environment.environment_report = report_with_a_finalizer
    """
    result = run_spp_child(hook, ["env"])
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr == "spp: interrupted: rerun the same command to resume\n"
    assert result.stdout == ""  # nothing printed as if done


def interrupt_around_the_prune_publish(when: str) -> str:
    """A hook: SIGINT just before the prune stage's final publish step, or just after it returned."""
    before, after = (SEND_SIGINT, "") if when == "before" else ("", SEND_SIGINT)
    return f"""
        import spp_cli.stages.prune as prune_stage
        def publish_then_interrupt(*args, original=prune_stage.publish, **kwargs):
            {before}
            result = original(*args, **kwargs)
            {after}
            return result
        prune_stage.publish = publish_then_interrupt
    """


PRUNE = ["prune", "--method", "magnitude", "--sparsity", "0.5"]


def test_a_ctrl_c_after_the_final_publish_leaves_the_run_done(random_model_dir, tmp_path):
    """The output is complete: the result prints and the exit is 0 (it was 130 with a complete output)."""
    out = tmp_path / "pruned"
    result = run_spp_child(interrupt_around_the_prune_publish("after"), [*PRUNE, str(random_model_dir), "--out",
                                                                         str(out)])
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert f"-> {out}" in result.stdout and "interrupted" not in result.stderr
    assert (out / "spp.json").is_file()


def test_a_ctrl_c_before_the_final_publish_interrupts_with_nothing_published(random_model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = run_spp_child(interrupt_around_the_prune_publish("before"), [*PRUNE, str(random_model_dir), "--out",
                                                                          str(out)])
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr.endswith("spp: interrupted: rerun the same command to resume\n") and result.stdout == ""
    assert not out.exists()


def test_a_stage_of_spp_run_publishes_without_deciding_the_run(monkeypatch):
    """In `spp run` a stage's publish is not the end (run.json decides): a Ctrl-C after it interrupts the run."""
    import signal

    from spp_cli import interrupts

    monkeypatch.setattr(interrupts, "_state", {"console": True, "decided": False, "more_to_come": 0})
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the test process keeps its own SIGINT handler
    with interrupts.more_to_come():
        interrupts.output_published()
    assert not interrupts._state["decided"]
    interrupts.output_published()
    assert interrupts._state["decided"]
