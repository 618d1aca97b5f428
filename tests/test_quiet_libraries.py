"""Libraries' own progress bars (transformers' "Loading weights" / "Writing model shards", the Hub's, datasets')
never reach spp's output unless `spp -v` (spp_cli/cli.py _quiet_libraries): every command that loads or saves a
model, on a model saved in several shards, prints only spp's own lines."""

import pytest
from conftest import FIXTURE_DATA, run_spp
from tiny_models import save_random_model

ALPACA = FIXTURE_DATA / "alpaca" / "alpaca_small.json"
BAR = "%|"  # tqdm's "Writing model shards: 100%|██████████| 3/3"


@pytest.fixture
def bars_on(monkeypatch):
    """The libraries' bars as a fresh process has them (an earlier in-process command turned them off, or set
    HF_DATASETS_DISABLE_PROGRESS_BARS before datasets was imported, which datasets then reads as final)."""
    import sys

    import datasets
    import huggingface_hub
    import transformers

    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(sys.modules["datasets.utils.tqdm"], "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    transformers.utils.logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
    datasets.enable_progress_bars()
    assert datasets.is_progress_bar_enabled()


@pytest.fixture
def sharded_model(tmp_path):
    """A random LLaMA of ~6 MB in 2 MB shards: its outputs keep 3 MB shards, so save_pretrained writes several."""
    directory = save_random_model(tmp_path / "dense", shard="2MB", hidden_size=256, intermediate_size=512)
    assert len(list(directory.glob("*.safetensors"))) > 2
    return directory


def test_no_library_bar_reaches_the_output_of_prune_finetune_merge_and_eval(bars_on, sharded_model, tmp_path,
                                                                           capsys):
    pruned, tuned, merged = tmp_path / "pruned", tmp_path / "tuned", tmp_path / "merged"
    commands = [
        ["prune", sharded_model, "--method", "magnitude", "--sparsity", "0.5", "--streaming", "off", "--out", pruned],
        ["finetune", pruned, "--data", ALPACA, "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
         "--seqlen", "32", "--val-size", "0", "--no-merge", "--out", tuned],
        ["merge", tuned, "--out", merged],
        ["eval", merged, "--tasks", f"ppl:{ALPACA}", "--seqlen", "32", "--limit", "2", "--out", tmp_path / "r.json"],
    ]
    for argv in commands:
        code, out, err = run_spp(argv, capsys)
        assert code == 0, (argv[0], err)
        assert BAR not in out + err, (argv[0], out + err)
    assert len(list(pruned.glob("*.safetensors"))) > 1  # save_pretrained wrote shards


def test_verbose_lets_the_bars_through(bars_on, sharded_model, tmp_path, capsys):
    """What the test above looks for is there with -v: "Loading weights" and "Writing model shards"."""
    code, _, err = run_spp(["-v", "prune", sharded_model, "--method", "magnitude", "--sparsity", "0.5",
                            "--streaming", "off", "--out", tmp_path / "pruned"], capsys)
    assert code == 0 and "Loading weights" in err and "Writing model shards" in err and BAR in err


def test_datasets_bars_are_off_after_a_command(bars_on, tmp_path, capsys):
    """An online --data/--calib source goes through datasets.load_dataset ("Generating train split")."""
    import datasets

    code, _, _ = run_spp(["eval", "builtin:tiny-llama", "--tasks", f"ppl:{ALPACA}", "--seqlen", "32", "--limit", "1",
                          "--out", tmp_path / "r.json"], capsys)
    assert code == 0 and not datasets.is_progress_bar_enabled()
