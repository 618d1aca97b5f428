"""Fine-tuning: examples from records, training on the Alpaca subset, resume, NaN stop, LoRA, DDP on CPU."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import ALPACA, decoder_linears, pruned_tiny_llama, tiny_tokenizer

from spp_cli.adapters.spp import spp_layers
from spp_cli.data.examples import IGNORE_INDEX, PaddingCollator, alpaca_prompt, build_examples
from spp_cli.errors import BadInput, RuntimeFailure
from spp_cli.io.manifest import zeros_sha256
from spp_cli.recipe.schema import FinetuneStage
from spp_cli.training.trainer import (
    adapted_copy,
    check_options,
    gradient_accumulation,
    merge_trained,
    run_finetune,
    split_examples,
)

REPO = Path(__file__).resolve().parents[1]


def alpaca_records() -> list[dict]:
    try:
        from spp_cli.data.sources import read_records
    except ImportError:
        return json.loads(ALPACA.read_text())
    return read_records(str(ALPACA))


def small_config(**overrides) -> FinetuneStage:
    """8 examples a step in 2 micro-batches, seqlen 64, a 16-example held-out set."""
    options = dict(data="alpaca_small.json", max_steps=8, seqlen=64, batch_size=8, micro_batch_size=4, val_size=16,
                   lr=3e-2, save_steps=100, logging_steps=1)
    options.update(overrides)
    return FinetuneStage(**options)


def zero_hashes(model) -> dict[str, str]:
    return {n: zeros_sha256(model.get_submodule(n).weight) for n in decoder_linears(model)}


# ---- records -> examples ----


def test_alpaca_template_eos_and_prompt_mask():
    tokenizer = tiny_tokenizer()
    with_input = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    no_input = {"instruction": "Name a color.", "input": "", "output": "Blue"}
    assert alpaca_prompt("Add the numbers.", "2 and 3").endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert "### Input:" not in alpaca_prompt("Name a color.")
    full, masked = (build_examples(tokenizer, [with_input, no_input], 512, mask_prompt=m) for m in (False, True))
    for record, example, example_masked in zip([with_input, no_input], full, masked, strict=True):
        text = alpaca_prompt(record["instruction"], record["input"]) + record["output"]
        expected = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"] == expected == example["labels"]  # loss on every token by default
        prompt_len = len(tokenizer(alpaca_prompt(record["instruction"], record["input"]))["input_ids"])
        assert example_masked["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert example_masked["labels"][prompt_len:] == expected[prompt_len:]
    truncated = build_examples(tokenizer, [with_input], 10)[0]
    assert len(truncated["input_ids"]) == 10 and truncated["input_ids"][-1] != tokenizer.eos_token_id


def test_chat_without_template_and_packed_text():
    tokenizer = tiny_tokenizer()
    chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    (example,) = build_examples(tokenizer, [chat], 512, mask_prompt=True)
    assert example["input_ids"] == tokenizer("user: Hi there\nassistant: Hello")["input_ids"] + [tokenizer.eos_token_id]
    prompt_len = len(tokenizer("user: Hi there\nassistant: ")["input_ids"])
    assert example["labels"].count(IGNORE_INDEX) == prompt_len
    texts = [{"text": "one two three four five six seven eight nine ten " * 3}] * 5
    windows = build_examples(tokenizer, texts, 32)
    stream_len = 5 * (len(tokenizer(texts[0]["text"])["input_ids"]) + 1)
    assert len(windows) == stream_len // 32 and all(len(w["input_ids"]) == 32 for w in windows)
    batch = PaddingCollator(pad_token_id=tokenizer.pad_token_id)([windows[0], example])
    assert batch["input_ids"].shape == (2, 32) and int((batch["labels"][1] == IGNORE_INDEX).sum()) >= prompt_len


def test_batch_divisibility_and_val_split():
    with pytest.raises(BadInput, match="--batch-size 128 is not divisible by --micro-batch-size 8 x 3 processes"):
        check_options(FinetuneStage(data="d.jsonl"), world_size=3)
    assert gradient_accumulation(FinetuneStage(batch_size=128, micro_batch_size=8), 2) == 8
    train, val = split_examples(list(range(1000)), None, seed=42)  # default: min(2000, 5%)
    assert len(val) == 50 and len(train) == 950 and sorted(train + val) == list(range(1000))
    assert split_examples(list(range(10)), 0, 42) == (list(range(10)), [])


# ---- training ----


def test_training_lowers_loss_and_keeps_every_zero(tmp_path):
    model = pruned_tiny_llama(init_std=0.3)
    before = zero_hashes(model)
    result = run_finetune(model, tiny_tokenizer(), alpaca_records(), small_config(), tmp_path,
                          target_names=decoder_linears(model))
    assert result.steps == 8 and [p["step"] for p in result.train_curve] == list(range(1, 9))
    first, last = result.train_curve[0]["loss"], result.train_curve[-1]["loss"]
    assert last < first - 1.0 and result.eval_loss < first - 1.0  # ~9.0 -> ~7.0 on this seed
    assert len(spp_layers(result.model)) == 14 and result.adapter.keeps_zeros
    assert result.trainable_params == 12 * 16 * 64 + 2 * 16 * 128 + 10 * 64 + 4 * 128  # 16·in + out per layer
    elsewhere = adapted_copy(pruned_tiny_llama(init_std=0.3), result)  # how rank 0 merges after FSDP / ZeRO-3
    merged = merge_trained(result)
    assert zero_hashes(merged) == before
    want, got = merged.state_dict(), merge_trained(elsewhere).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-8"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json",
        "training_args.bin"]
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 100_000  # adapters only, not the base


def test_interrupted_run_resumes_to_the_same_adapters(tmp_path):
    """A 6-step run saving every 2 steps, against the same run killed after checkpoint-4 and rerun."""
    config = small_config(max_steps=6, save_steps=2, val_size=0)
    records = alpaca_records()
    whole = run_finetune(pruned_tiny_llama(init_std=0.3), tiny_tokenizer(), records, config, tmp_path / "a",
                         target_names=decoder_linears(pruned_tiny_llama()))
    checkpoints = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2
    # what a kill while saving step 6 leaves behind: checkpoint-4 and a partial checkpoint-6
    os.rename(checkpoints / "checkpoint-6", tmp_path / "finished-6")
    (checkpoints / "checkpoint-6").mkdir()
    adapter_file = "adapter_model.safetensors"
    os.link(tmp_path / "finished-6" / adapter_file, checkpoints / "checkpoint-6" / adapter_file)
    resumed = run_finetune(pruned_tiny_llama(init_std=0.3), tiny_tokenizer(), records, config, tmp_path / "a",
                           target_names=decoder_linears(pruned_tiny_llama()))
    assert resumed.resumed_from == str(checkpoints / "checkpoint-4") and resumed.steps == 6  # partial one skipped
    want = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys() and len(want) == 28
    assert all(torch.equal(want[n], got[n]) for n in want)  # bit-identical on CPU fp32
    assert [p["loss"] for p in resumed.train_curve] == [p["loss"] for p in whole.train_curve]


def test_nan_loss_stops_with_runtime_failure_keeping_the_last_checkpoint(tmp_path):
    model = pruned_tiny_llama()
    calls = {"n": 0}

    def poison_after_two_steps(module, inputs, output):  # 2 micro-batches a step
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 4 else output

    model.lm_head.register_forward_hook(poison_after_two_steps)
    with pytest.raises(RuntimeFailure, match=r"NaN/inf at step 3: the last good checkpoint is .*checkpoint-2"):
        run_finetune(model, tiny_tokenizer(), alpaca_records(), small_config(save_steps=1, val_size=0), tmp_path,
                     target_names=decoder_linears(model))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_lora_baseline_trains_and_merges_dense(tmp_path):
    model = pruned_tiny_llama(init_std=0.3)
    names = decoder_linears(model)
    before = zero_hashes(model)
    result = run_finetune(model, tiny_tokenizer(), alpaca_records(), small_config(method="lora", max_steps=3),
                          tmp_path, target_names=names)
    assert not result.adapter.keeps_zeros
    assert result.trainable_params == 8 * 8 * (64 + 64) + 6 * 8 * (64 + 128)  # r·(in + out)
    merged = merge_trained(result)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert all(zero_hashes(merged)[n] != before[n] for n in names)  # LoRA's merge loses the zeros (expected)


DDP_SCRIPT = textwrap.dedent("""
    import atexit, json, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    import torch.distributed as dist
    from spp_cli.training.trainer import merge_trained, run_finetune
    from spp_cli.io.manifest import weight_sha256
    from test_trainer import alpaca_records, small_config, zero_hashes
    from tiny_models import decoder_linears, pruned_tiny_llama, tiny_tokenizer

    def record_teardown():  # registered first, so it runs after spp's exit handler (atexit is last in, first out)
        open(f"{{sys.argv[2]}}.rank{{rank}}.exit", "w").write(str(dist.is_initialized()))

    atexit.register(record_teardown)
    model = pruned_tiny_llama(init_std=0.3)
    before = zero_hashes(model)
    config = small_config(max_steps=2, batch_size=8, micro_batch_size=2, val_size=0)
    result = run_finetune(model, tiny_tokenizer(), alpaca_records()[:200], config, sys.argv[1],
                          target_names=decoder_linears(model))
    rank = dist.get_rank()
    adapters = {{k: weight_sha256(v) for k, v in result.adapter.trainable_state(result.model).items()}}
    out = {{"rank": rank, "world": dist.get_world_size(), "backend": dist.get_backend(),
           "steps": result.steps, "adapters": adapters}}
    if result.is_main_process:  # merge and save on rank 0 only, on the full weights
        out.update(before=before, after=zero_hashes(merge_trained(result)))
    json.dump(out, open(f"{{sys.argv[2]}}.rank{{rank}}.json", "w"))
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_two_cpu_processes_gloo_keep_every_zero(tmp_path):
    """torchrun, 2 processes, gloo: both ranks end with the same adapters; rank 0's merge keeps every zero."""
    script = tmp_path / "ddp_finetune.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), str(tmp_path / "work"), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world"] == 2 and rank0["backend"] == "gloo" and rank0["steps"] == rank1["steps"] == 2
    assert rank0["adapters"] == rank1["adapters"] and len(rank0["adapters"]) == 28  # gradients were all-reduced
    assert rank0["after"] == rank0["before"] and len(rank0["before"]) == 14 and "after" not in rank1
    # gloo's threads must not outlive the interpreter (they can abort a finished rank): the group is gone at exit
    assert [(tmp_path / f"out.rank{r}.exit").read_text() for r in (0, 1)] == ["False", "False"]


def test_gradient_checkpointing_trains_the_adapters(tmp_path):
    model = pruned_tiny_llama(init_std=0.3)
    result = run_finetune(model, tiny_tokenizer(), alpaca_records(),
                          small_config(max_steps=2, gradient_checkpointing=True, val_size=0), tmp_path,
                          target_names=decoder_linears(model))
    assert all(int(torch.count_nonzero(layer.spp_beta)) > 0 for layer in spp_layers(result.model).values())


# every zero-keeping method through the same engine: (lr for 8 tiny steps, trainable parameters)
ZERO_KEEPING_RUNS = {
    "masked-lora": (3e-2, 8 * 8 * (64 + 64) + 6 * 8 * (64 + 128)),  # r·(in + out), as LoRA
    "ia3": (3e-2, 2 * 128 + 2 * (4 * 64 + 2 * 128)),  # down_proj scales its input (128), the others their output
    "masked-full": (3e-3, 2 * (4 * 64 * 64 + 3 * 64 * 128)),  # every weight of every target
}


@pytest.mark.parametrize("method", sorted(ZERO_KEEPING_RUNS))
def test_every_zero_keeping_method_lowers_the_loss_and_keeps_every_zero(method, tmp_path):
    lr, trainable = ZERO_KEEPING_RUNS[method]
    model = pruned_tiny_llama(init_std=0.3)
    before = zero_hashes(model)
    result = run_finetune(model, tiny_tokenizer(), alpaca_records(), small_config(method=method, lr=lr, val_size=0),
                          tmp_path, target_names=decoder_linears(model))
    first, last = result.train_curve[0]["loss"], result.train_curve[-1]["loss"]
    assert result.steps == 8 and last < first - 0.5, (first, last)
    assert result.trainable_params == trainable and result.adapter.keeps_zeros
    merged = merge_trained(result)
    assert type(merged).__name__ == "LlamaForCausalLM" and zero_hashes(merged) == before


# ---- one rule for devices and precision ----


def test_the_engine_uses_the_environment_device_rule():
    from spp_cli.environment import resolve_device
    from spp_cli.training.trainer import training_device

    assert training_device("cpu") == resolve_device("cpu") == "cpu"
    for device, message in (("mps", "unknown device 'mps'"), ("tpu", "unknown device 'tpu'")):
        lines = []
        for rule in (training_device, resolve_device):  # mps is not offered (spp_cli/vocabulary.py): both refuse it
            with pytest.raises(BadInput, match=message) as error:
                rule(device)
            lines.append(str(error.value))
        assert lines[0] == lines[1]


def test_the_fingerprint_records_the_precision_training_runs_in(monkeypatch):
    from spp_cli.stages.finetune import fingerprinted_options
    from spp_cli.training.trainer import resolved_precision

    assert resolved_precision("auto", "cpu") == resolved_precision("float32", "cuda") == "float32"
    assert resolved_precision("float16", "cuda:0") == "autocast(float16)"
    with pytest.raises(BadInput, match="--dtype bfloat16 training needs a CUDA GPU"):
        resolved_precision("bfloat16", "cpu")
    outcomes = {}
    for bf16 in (True, False):  # what "auto" resolves to on a GPU with and without bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        outcomes[bf16] = fingerprinted_options(small_config(), resolved_precision("auto", "cuda"))["precision"]
    assert outcomes == {True: "autocast(bfloat16)", False: "autocast(float16)"}


def test_save_steps_default_is_the_one_the_engine_uses():
    from spp_cli.recipe.reference import describe_schema

    rows = {key: default for section, key, _, default, _ in describe_schema() if section == "finetune"}
    assert rows["save_steps"] == "200" == str(FinetuneStage(data="d").save_steps)
