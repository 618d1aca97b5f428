"""The finetune and merge stages for every method: zeros verified against the parent, LoRA dense and labelled,
provenance checks before training (a changed parent, a dense parent), bad options as one-line BadInput."""

import json

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import ALPACA, save_random_model

from spp_cli.adapters import METHODS, REGISTRY
from spp_cli.errors import BadInput
from spp_cli.recipe.schema import FinetuneStage, schema_fields
from spp_cli.stages.finetune import finetune
from spp_cli.stages.merge import merge_adapter
from spp_cli.stages.prune import prune
from spp_cli.stages.verify import verify_checkpoint

TINY = dict(data=str(ALPACA), max_steps=2, batch_size=4, micro_batch_size=4, seqlen=32, val_size=0, device="cpu")


@pytest.fixture(params=["unstructured", "2:4"])
def pruned(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    save_random_model(root / "dense")
    sparsity = 0.5 if request.param == "unstructured" else None
    prune(str(root / "dense"), root / "pruned", method="magnitude", pattern=request.param, sparsity=sparsity,
          device="cpu")
    return root / "pruned"


@pytest.mark.parametrize("method", [m for m in METHODS if REGISTRY[m].keeps_zeros])
def test_every_zero_keeping_method_passes_verify_against_its_parent(method, pruned, tmp_path):
    manifest = finetune(str(pruned), tmp_path / "out", method=method, **TINY)
    report = verify_checkpoint(tmp_path / "out", against=pruned)
    assert report["ok"] and report["lost_zeros"] == 0 and report["layers_checked"] == 14
    assert manifest["method"] == method and manifest["dense"] is False
    assert manifest["pattern"] == json.loads((pruned / "spp.json").read_text())["pattern"]
    assert manifest["config"]["lr"] == REGISTRY[method].default_lr  # None -> the method's published default
    assert manifest["run"]["resumed_from"] is None and "resumed_from" not in manifest["training"]


def test_lora_is_dense_records_its_real_config_and_spp_on_it_is_refused(pruned, tmp_path):
    manifest = finetune(str(pruned), tmp_path / "lora", method="lora", lora_r=4, lora_alpha=8.0, **TINY)
    assert manifest["dense"] is True and manifest["pattern"] is None
    adapter = manifest["adapter"]
    assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == ("LORA", 4, 8.0,
                                                                                                   0.05)
    assert manifest["config"]["lora_r"] == 4 and "groups" not in manifest["config"]
    report = verify_checkpoint(tmp_path / "lora", against=pruned)
    assert report["dense"] is True and report["lost_zeros"] > 0  # LoRA loses zeros, and says it is dense
    with pytest.raises(BadInput, match="is a dense lora output .* --method spp keeps zeros"):
        finetune(str(tmp_path / "lora"), tmp_path / "spp", method="spp", **TINY)
    assert not (tmp_path / "spp").exists()


def test_a_parent_changed_after_spp_wrote_it_is_refused_before_training(pruned, tmp_path):
    weights = pruned / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.1.mlp.up_proj.weight"
    nonzero = tensors[key].flatten().nonzero()[0].item()
    tensors[key].view(-1)[nonzero] += 1.0  # a value changed, the zero set kept: only weight_sha256 can tell
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(BadInput) as error:
        finetune(str(pruned), tmp_path / "out", method="spp", **TINY)
    assert str(error.value).startswith(f"'{pruned}': layer model.layers.1.mlp.up_proj no longer matches its spp.json")
    assert not any(tmp_path.iterdir())  # nothing left behind


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "lora", "groups": 8}, "groups: applies to method spp, not lora; drop it or change the method"),
    ({"method": "ia3", "dropout": 0.0}, "dropout: applies to method spp or lora or masked-lora, not ia3"),
    ({"method": "sft"}, "method: 'sft' is not one of spp, lora, masked-lora, ia3, masked-full"),
])
def test_bad_method_options_fail_before_loading(options, message, tmp_path):
    with pytest.raises(BadInput, match=message):
        finetune(str(tmp_path / "missing-model"), tmp_path / "out", **{**TINY, **options})


def test_the_stage_takes_every_schema_field_as_a_keyword(tmp_path):
    keys = {f.name for f in schema_fields(FinetuneStage)}
    assert {"data", "method", "lr", "lora_r", "lora_alpha", "save_steps", "logging_steps"} <= keys
    with pytest.raises(BadInput, match="unknown finetune option 'learning_rate'; did you mean 'lr'"):
        finetune("m", tmp_path / "out", learning_rate=1e-3, **TINY)


@pytest.mark.parametrize("method", ["masked-lora", "ia3", "masked-full", "lora"])
def test_no_merge_then_spp_merge_equals_the_direct_merge(method, pruned, tmp_path):
    direct = finetune(str(pruned), tmp_path / "direct", method=method, **TINY)
    finetune(str(pruned), tmp_path / "adapter-only", method=method, no_merge=True, **TINY)
    merged = merge_adapter(tmp_path / "adapter-only" / "adapter", tmp_path / "merged")
    assert merged["method"] == method and merged["dense"] is direct["dense"]
    assert {n: r["weight_sha256"] for n, r in merged["layers"].items()} == {
        n: r["weight_sha256"] for n, r in direct["layers"].items()}
    assert verify_checkpoint(tmp_path / "merged", against=pruned)["ok"] is REGISTRY[method].keeps_zeros


def test_the_console_says_when_a_run_resumed_and_when_a_merge_is_dense():
    from rich.console import Console

    from spp_cli.render import render_finetune

    console = Console(record=True, width=200)
    manifest = {"method": "lora", "dense": True, "seconds": 1.0, "training": {"steps": 3, "loss_curve": []},
                "run": {"resumed_from": "checkpoint-2"}}
    render_finetune(console, manifest, "out")
    lines = console.export_text().splitlines()
    assert lines[1:] == ["  resumed from checkpoint-2 (the result equals an uninterrupted run's)",
                         "  note: the lora merge makes every weight dense; the zero check was skipped"]


def test_a_merge_rounded_away_is_reported_not_published_silently(tmp_path):
    """Gemma 3 270M in bf16 showed it: SPP's multipliers within 2^-9 of 1 vanish when cast back. The shipped
    model is fp16; an update of 1e-9 vanishes the same way, and the manifest says so."""
    import spp_cli

    spp_cli.prune("builtin:tiny-llama", tmp_path / "pruned", method="magnitude", sparsity=0.5)
    manifest = spp_cli.finetune(str(tmp_path / "pruned"), tmp_path / "tuned", data="builtin:python-docs", max_steps=1,
                                lr=1e-9, batch_size=2, micro_batch_size=2, seqlen=32, val_size=0)
    assert len(manifest["warnings"]) == 1 and "bit-identical to the parent's" in manifest["warnings"][0]
    assert "float16" in manifest["warnings"][0]


def test_the_stage_reports_its_steps_and_warnings_as_events(tmp_path):
    save_random_model(tmp_path / "dense")
    prune(str(tmp_path / "dense"), tmp_path / "pruned", method="magnitude", sparsity=0.5, device="cpu")
    (tmp_path / "pruned" / "spp.json").unlink()  # a model spp did not write: its zeros are the mask, and it says so
    events = []
    finetune(str(tmp_path / "pruned"), tmp_path / "out", method="spp", on_event=events.append, **TINY)
    assert {event.stage for event in events} == {"finetune"}
    warnings = [event.payload for event in events if event.kind == "warning"]
    assert warnings == [f"'{tmp_path / 'pruned'}' has no spp.json: its current zeros define the mask to keep"]
    steps = [event.payload for event in events if event.kind == "step"]
    assert [step["step"] for step in steps] == [1, 2] and all(step["total"] == 2 for step in steps)
    assert {event.kind for event in events} == {"plan", "warning", "step", "note"}
    records = len(json.loads(ALPACA.read_text()))
    assert [event.payload for event in events if event.kind == "note"] == [
        f"loading {tmp_path / 'pruned'} and tokenizing {records} training records", "training: 2 steps on "
        f"{records} examples"]


class Crash(Exception):
    pass


def test_a_resumed_finetune_says_from_which_step_and_the_held_out_evaluation_is_announced(tmp_path):
    save_random_model(tmp_path / "dense")
    prune(str(tmp_path / "dense"), tmp_path / "pruned", method="magnitude", sparsity=0.5, device="cpu")
    options = {**TINY, "max_steps": 3, "save_steps": 1, "val_size": 2}

    def crash_at_step_2(event):
        if event.kind == "step" and event.payload["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        finetune(str(tmp_path / "pruned"), tmp_path / "out", on_event=crash_at_step_2, **options)
    events = []
    manifest = finetune(str(tmp_path / "pruned"), tmp_path / "out", on_event=events.append, **options)
    checkpoint = tmp_path / ".out.spp-work" / "checkpoints" / "checkpoint-1"
    records = len(json.loads(ALPACA.read_text()))
    assert [event.payload for event in events if event.kind == "note"] == [
        f"loading {tmp_path / 'pruned'} and tokenizing {records} training records",
        f"resuming from step 1 (checkpoint {checkpoint})",
        "training: steps 2-3 of 3",
        "held-out loss: evaluating on 2 examples after the last step",
    ]
    assert [event.payload["step"] for event in events if event.kind == "step"] == [2, 3]
    assert manifest["run"]["resumed_from"] == "checkpoint-1"
    # each held-out evaluation reports its batches (it printed nothing for tens of seconds at full size)
    assert [event.payload for event in events if event.kind == "progress"] == [
        {"done": 1, "total": 1, "label": f"held-out loss after step {step}"} for step in (2, 3)]


QUICKSTART = dict(method="spp", data="builtin:python-docs:train", max_steps=120, batch_size=16, micro_batch_size=16,
                  seqlen=256, lr=4.0e-3, dropout=0, val_size=0, device="cpu")


def test_the_fingerprint_of_the_quickstart_options_is_the_one_it_always_was(tmp_path):
    """Pinned from the stage before it became named steps (commit 64e02f8): a changed dict re-runs every
    finished fine-tune and changes the quickstart's manifest_sha256."""
    from spp_cli.stages.finetune import resolve

    plan = resolve("builtin:tiny-llama", tmp_path / "out", QUICKSTART, {})
    assert plan.config == {
        "method": "spp", "data": "builtin:python-docs:train", "max_steps": 120, "epochs": 3.0, "lr": 0.004,
        "batch_size": 16, "micro_batch_size": 16, "seqlen": 256, "seed": 42, "data_format": "auto",
        "mask_prompt": False, "gradient_checkpointing": False, "no_merge": False, "val_size": 0,
        "weight_decay": 0.001, "warmup_ratio": 0.03, "loss_normalization": "batch", "dtype": "auto", "groups": 16,
        "dropout": 0.0, "forward": "auto", "lora_r": 8, "lora_alpha": 16, "lr_scheduler": "linear",
        "max_grad_norm": 1.0, "precision": "float32"}
    assert plan.fingerprint == "474a7bb773ad7ed4943ba892fe0f2cd48187d9f96ed1331e72d6122e46cdd107"
