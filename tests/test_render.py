"""The console lines of spp_cli/render.py for the summaries a user reads after prune, merge and run."""

from rich.console import Console

from spp_cli.render import render_merge, render_prune, render_run


def lines_of(render, *args) -> list[str]:
    console = Console(record=True, width=300)
    render(console, *args)
    return console.export_text().splitlines()


PRUNED = {"method": "wanda", "pattern": "unstructured", "overall_sparsity": 0.6, "target_sparsity": 0.6,
          "layers": {"a": {}, "b": {}}, "seconds": 2.0,
          "config": {"calib": "builtin:python-docs", "nsamples": 64, "seqlen": 256}}


def test_the_prune_summary_shows_calibration_owl_dsnot_and_a_resume():
    owl = {"profile": "owl", "threshold": 5.0, "lambda": 0.08, "layer_sparsity": {"0": 0.55, "1": 0.65}}
    manifest = {**PRUNED, "sparsity_profile": owl, "refine": "dsnot", "resumed_from_block": 2}
    assert lines_of(render_prune, manifest, "out") == [
        "pruned 2 linears with wanda (unstructured): overall sparsity of the pruned linears 0.6000 (target 0.6000) "
        "in 2.0 s -> out",
        "  calibration: 64 windows of 256 tokens from builtin:python-docs (nsamples, seqlen)",
        "  OWL sparsity profile (threshold 5.0, lambda 0.08): block sparsities 0.5500 to 0.6500",
        "  DSnoT refined the masks (prune-and-grow within each row, same sparsity)",
        "  resumed: blocks 1-2 were pruned by the interrupted run",
    ]
    magnitude = {**PRUNED, "method": "magnitude", "config": {"calib": None, "nsamples": None, "seqlen": None}}
    assert lines_of(render_prune, magnitude, "out")[1:] == ["  calibration: none (magnitude reads only the weights)"]


def test_merge_says_what_it_merged_not_that_it_fine_tuned():
    manifest = {"stage": "merge", "method": "spp", "parent": {"path": "runs/w50"}, "dense": False,
                "layers": {"a": {}, "b": {}, "c": {}}, "overall_sparsity": 0.5, "seconds": 1.5,
                "training": {"steps": 5, "loss_curve": []}}
    assert lines_of(render_merge, manifest, "merged") == [
        "merged the spp adapter into runs/w50: 3 pruned linears, 1.5 s -> merged",
        "  zeros kept: overall sparsity of the pruned linears 0.5000",
    ]
    dense = {**manifest, "method": "lora", "dense": True}
    assert lines_of(render_merge, dense, "merged")[1] == (
        "  note: the lora merge makes every weight dense; the zero check was skipped")


def test_run_names_what_it_did_with_each_stage_and_keeps_the_eval_notes():
    stages = [
        {"name": "prune", "type": "prune", "output": "r/prune", "skipped": True, "state": "skipped", "seconds": 3.0},
        {"name": "finetune", "type": "finetune", "output": "r/finetune", "skipped": False, "state": "resumed",
         "resumed_from": "after step 6", "seconds": 11.8},
        {"name": "eval", "type": "eval", "output": "r/eval/results.json", "skipped": False, "state": "rerun",
         "seconds": 4.25},
    ]
    summary = {"dry_run": False, "stages": stages, "notes": ["limit 8: not comparable"], "report": "r/report.md"}
    assert lines_of(render_run, summary) == [
        "note: limit 8: not comparable",
        "stage prune (prune): skipped (finished earlier with the same options) -> r/prune",
        "stage finetune (finetune): resumed after step 6 of the interrupted run, 11.8 s -> r/finetune",
        "stage eval (eval): rerun (changed options replaced the earlier output), 4.2 s -> r/eval/results.json",
        "report: r/report.md",
    ]


def test_a_held_out_evaluation_is_drawn_as_it_goes():
    """The fine-tune's held-out batches (training/phases.py HeldOutProgress) become lines about every tenth."""
    from spp_cli.events import Event
    from spp_cli.render import event_printer

    def draw(console):
        on_event = event_printer(console)
        for done in range(1, 21):
            on_event(Event("finetune", "progress", {"done": done, "total": 20, "label": "held-out loss after step 40"}))

    lines = lines_of(draw)
    assert lines[0] == "  held-out loss after step 40 1/20" and lines[-1] == "  held-out loss after step 40 20/20"
    assert len(lines) == 11
