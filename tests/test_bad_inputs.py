"""Bad input, across the CLI and recipes: exit 2, one line on stderr naming the problem, no traceback, and no
new files left behind. Rows run in-process (the same code path as the `spp` console script)."""

import json
from pathlib import Path

import pytest
from conftest import run_spp
from tiny_models import save_random_model

C4 = "c4/c4-train.00000-of-01024.first1000.jsonl"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A dense model, a pruned one, a dense model without zeros, data files and recipes, made once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    dense = root / "dense"
    save_random_model(dense)
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": "def f(x): return x " * 40}) + "\n" for _ in range(20)))
    (root / "empty.jsonl").write_text("")
    (root / "short.jsonl").write_text("".join(json.dumps({"text": "tiny"}) + "\n" for _ in range(3)))
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (root / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    (root / "bad.yaml").write_text("model: builtin:tiny-llama\nstages:\n  - name: prune\n    type: prune\n   method: wanda\n")
    (root / "unknown.yaml").write_text(
        "model: builtin:tiny-llama\nstages:\n  - {name: prune, type: prune, method: wanda, sparsity: 0.5, sparsty: 0.6}\n"
    )
    (root / "good.yaml").write_text(
        "model: builtin:tiny-llama\nstages:\n  - {name: prune, type: prune, method: magnitude, sparsity: 0.5}\n"
    )
    (root / "bos.yaml").write_text(
        "model: builtin:tiny-llama\nstages:\n  - {type: eval, tasks: [wikitext2], bos: maybe}\n"
    )
    (root / "max-memory.yaml").write_text(
        "model: builtin:tiny-llama\nstages:\n  - {type: eval, tasks: [wikitext2], device_map: auto, max_memory: {cpu: lots}}\n"
    )
    (root / "missing-data.yaml").write_text(
        f"model: {root / 'dense'}\nstages:\n  - {{type: prune, method: magnitude}}\n"
        f"  - {{type: finetune, data: {root / 'nowhere.jsonl'}}}\n"
    )
    (root / "sweep.yaml").write_text(  # a sweep whose lr is one number, not a list
        "model: builtin:tiny-llama\nstages:\n  - {type: finetune, data: builtin:python-docs:train, sweep: {lr: 3}}\n"
    )
    (root / "not-spp").mkdir()
    (root / "not-spp" / "notes.txt").write_text("my notes")
    from safetensors.torch import load_file, save_file

    truncated = root / "truncated"
    truncated.mkdir()
    for item in dense.iterdir():
        (truncated / item.name).write_bytes(item.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((dense / "config.json").read_text())
    corrupt = root / "corrupt-config"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    save_file(load_file(dense / "model.safetensors"), corrupt / "model.safetensors")
    return root


def rows(data: Path):
    evaluate = ["eval", "{root}/dense", "--tasks", "wikitext2", "--data-dir", str(data), "--out", "{root}/r.json"]
    prune = ["prune", "{root}/dense", "--out", "{root}/out", "--calib", "{root}/calib.jsonl", "--nsamples", "2",
             "--seqlen", "32"]
    return [
        # (id, argv, a fragment of the one-line message)
        ("missing model", ["prune", "{root}/nowhere", "--method", "wanda", "--sparsity", "0.5", "--out", "{root}/out"], "does not exist"),
        ("corrupt config", ["prune", "{root}/corrupt-config", "--method", "magnitude", "--sparsity", "0.5", "--out", "{root}/out"], "could not load model"),
        ("config without weights", ["prune", "{root}/no-weights", "--method", "magnitude", "--sparsity", "0.5", "--out", "{root}/out"], "no weights"),
        ("truncated safetensors", ["prune", "{root}/truncated", "--method", "magnitude", "--sparsity", "0.5", "--out", "{root}/out"], "truncated"),
        ("unknown method", [*prune, "--method", "obs", "--sparsity", "0.5"], "'obs' is not one of"),
        ("unknown pattern", [*prune, "--method", "wanda", "--pattern", "blocky", "--sparsity", "0.5"], "blocky"),
        ("sparsity -0.1", [*prune, "--method", "wanda", "--sparsity", "-0.1"], "out of range"),
        ("sparsity 0", [*prune, "--method", "wanda", "--sparsity", "0"], "out of range"),
        ("sparsity 1", [*prune, "--method", "wanda", "--sparsity", "1"], "out of range"),
        ("sparsity 1.5", [*prune, "--method", "wanda", "--sparsity", "1.5"], "out of range"),
        ("sparsity abc", [*prune, "--method", "wanda", "--sparsity", "abc"], "--sparsity"),
        ("N:M 4:2", [*prune, "--method", "wanda", "--pattern", "4:2"], "4:2"),
        ("N:M 0:4", [*prune, "--method", "wanda", "--pattern", "0:4"], "0:4"),
        ("sparsity contradicts N:M", [*prune, "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7"], "2:4"),
        ("M does not divide in_features", [*prune, "--method", "magnitude", "--pattern", "2:7"], "7"),
        ("nsamples 0", [*prune[:-4], "--nsamples", "0", "--seqlen", "32", "--method", "wanda", "--sparsity", "0.5"], "--nsamples: 0 is out of range"),
        ("nsamples negative", [*prune[:-4], "--nsamples", "-3", "--seqlen", "32", "--method", "wanda", "--sparsity", "0.5"], "--nsamples: -3 is out of range"),
        ("nsamples beyond the data", [*prune[:-4], "--nsamples", "5000", "--seqlen", "32", "--method", "wanda", "--sparsity", "0.5"], "fewer than nsamples x seqlen"),
        ("seqlen beyond positions", [*prune[:-2], "--seqlen", "4096", "--method", "wanda", "--sparsity", "0.5"], "exceeds the model's 256 positions"),
        ("calibration shorter than a window", ["prune", "{root}/dense", "--out", "{root}/out", "--calib", "{root}/short.jsonl", "--nsamples", "2", "--seqlen", "200", "--method", "wanda", "--sparsity", "0.5"], "fewer than one window of 200"),
        ("empty calibration data", [*prune[:4], "--calib", "{root}/empty.jsonl", "--method", "wanda", "--sparsity", "0.5"], "has no records"),
        ("non-UTF-8 data", [*prune[:4], "--calib", "{root}/latin1.jsonl", "--method", "wanda", "--sparsity", "0.5"], "not UTF-8"),
        ("malformed JSON line", [*prune[:4], "--calib", "{root}/broken.jsonl", "--method", "wanda", "--sparsity", "0.5"], "broken.jsonl line 3: not valid JSON"),
        ("c4 while offline", [*prune[:4], "--calib", "c4", "--method", "wanda", "--sparsity", "0.5"], "offline"),
        ("--use-variant with magnitude", [*prune, "--method", "magnitude", "--sparsity", "0.5", "--use-variant"], "--use-variant"),
        ("targets match nothing", [*prune, "--method", "magnitude", "--sparsity", "0.5", "--targets", "no_such_layer"], "no linear layer inside model.layers matches"),
        ("bad targets regex", [*prune, "--method", "magnitude", "--sparsity", "0.5", "--targets", "(unclosed"], "targets"),
        ("unknown dtype", [*prune, "--method", "magnitude", "--sparsity", "0.5", "--dtype", "float8"], "'float8' is not one of 'auto'"),
        ("cuda without a GPU", [*prune, "--method", "magnitude", "--sparsity", "0.5", "--device", "cuda"], "no CUDA GPU"),
        ("output exists, not spp", [*prune[:2], "--out", "{root}/not-spp", "--method", "magnitude", "--sparsity", "0.5"], "is a folder that spp did not write"),
        ("output inside the input model", [*prune[:2], "--out", "{root}/dense/pruned", "--method", "magnitude", "--sparsity", "0.5"], "overlaps the input"),
        ("YAML syntax error", ["run", "{root}/bad.yaml"], "line 5"),
        ("unknown recipe key", ["run", "{root}/unknown.yaml"], "stages[0] (prune): unknown key 'sparsty'"),
        ("missing recipe", ["run", "{root}/nope.yaml"], "no such recipe file"),
        ("override of an unknown stage", ["run", "{root}/good.yaml", "stages.tune.lr=1", "--dry-run"], "no stage named 'tune'"),
        ("unknown eval task", ["eval", "{root}/dense", "--tasks", "boolqq", "--out", "{root}/r.json"], "boolq"),
        ("hub task offline without data", ["eval", "{root}/dense", "--tasks", "arc_easy", "--out", "{root}/r.json"], "pass --data-dir DIR with DIR/arc_easy/"),
        ("eval --out is a directory", ["eval", "{root}/dense", "--tasks", "wikitext2", "--data-dir", str(data), "--out", "{root}/not-spp"], "is a directory"),
        ("eval --out is someone else's file", ["eval", "{root}/dense", "--tasks", "wikitext2", "--data-dir", str(data), "--out", "{root}/not-spp/notes.txt"], "is not an spp results file"),
        ("eval --out inside the model", ["eval", "{root}/dense", "--tasks", "wikitext2", "--data-dir", str(data), "--out", "{root}/dense/results.json"], "overlaps the input"),
        ("eval limit 0", ["eval", "{root}/dense", "--tasks", "wikitext2", "--limit", "0", "--data-dir", str(data), "--out", "{root}/r.json"], "--limit: 0 is out of range"),
        ("verify a directory without spp.json", ["verify", "{root}/dense"], "has no spp.json"),
        ("merge something that is not an adapter", ["merge", "{root}/dense", "--out", "{root}/merged"], "adapter_config.json"),
        ("merge --streaming unknown", ["merge", "{root}/dense", "--out", "{root}/merged", "--streaming", "sometimes"], "'sometimes' is not one of"),
        ("finetune, no data", ["finetune", "{root}/dense", "--data", "{root}/none.jsonl", "--out", "{root}/ft"], "does not exist"),
        ("finetune, nothing to preserve", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--max-steps", "1", "--seqlen", "64"], "nothing to preserve"),
        ("finetune, default seqlen beyond the positions", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft"], "--seqlen 512 exceeds the model's 256 positions"),
        ("finetune, batch not divisible", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--batch-size", "10", "--micro-batch-size", "4"], "10"),
        ("finetune, fused with dropout", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--forward", "fused"], "--dropout 0"),
        ("finetune, empty data", ["finetune", "{root}/dense", "--data", "{root}/empty.jsonl", "--out", "{root}/ft"], "has no records"),
        # found while rebuilding the options and outputs (issue "Trust")
        ("--overwrite on a folder spp did not write", [*prune[:2], "--out", "{root}/not-spp", "--method", "magnitude", "--overwrite"], "spp never replaces those"),
        ("a plain file as --out", [*prune[:2], "--out", "{root}/calib.jsonl", "--method", "magnitude", "--overwrite"], "is a file that spp did not write"),
        ("--out on a read-only filesystem", [*prune[:2], "--out", "/sys/spp-out", "--method", "magnitude"], "cannot write '/sys/spp-out'"),
        ("device mps", [*prune, "--method", "magnitude", "--device", "mps"], "--device: 'mps' is not auto, cpu, cuda or cuda:N"),
        ("device gpu0", [*prune, "--method", "magnitude", "--device", "gpu0"], "--device: 'gpu0' is not"),
        ("seqlen 1", [*prune[:-2], "--seqlen", "1", "--method", "wanda"], "--seqlen: 1 is out of range"),
        ("nsamples not an integer", [*prune[:-4], "--nsamples", "1.5", "--method", "wanda"], "--nsamples"),
        ("misspelt option", [*prune, "--method", "wanda", "--sparsty", "0.5"], "No such option: --sparsty"),
        ("owl with 2:4", [*prune, "--method", "wanda", "--pattern", "2:4", "--sparsity-profile", "owl"], "owl needs pattern unstructured"),
        ("dsnot after magnitude", [*prune, "--method", "magnitude", "--refine", "dsnot"], "--refine: dsnot refines a wanda or sparsegpt mask"),
        ("reconstruct options without reconstruct", [*prune, "--method", "wanda", "--reconstruct-epochs", "3"], "--reconstruct-epochs: applies to refine reconstruct"),
        # the recovery curve and the recipe sweep (issue 24, item 3)
        ("eval steps with no held-out split", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--eval-steps", "2", "--val-size", "0"], "--eval-steps: scores the held-out split, which val_size 0 leaves empty"),
        ("a curve ppl without eval steps", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--eval-ppl-source", "wikitext2"], "--eval-ppl-source: is scored at every eval_steps"),
        ("a curve ppl source that is no ppl task", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--eval-steps", "2", "--eval-ppl-source", "boolq"], "'boolq' is not a perplexity task"),
        ("a sweep value that is not a list", ["run", "{root}/sweep.yaml", "--dry-run"], "stages[0] (finetune).sweep: lr: 3 is not allowed; use a non-empty list"),
        ("dsnot+reconstruct after magnitude", [*prune, "--method", "magnitude", "--refine", "dsnot+reconstruct"], "--refine: dsnot refines a wanda or sparsegpt mask"),
        ("reconstruct before dsnot", [*prune, "--method", "wanda", "--refine", "reconstruct+dsnot"], "'reconstruct+dsnot' is not one of"),
        ("reconstruct params without reconstruct", [*prune, "--method", "wanda", "--reconstruct-params", "spp"], "--reconstruct-params: applies to refine reconstruct"),
        ("unknown reconstruct params", [*prune, "--method", "wanda", "--refine", "reconstruct", "--reconstruct-params", "lora"], "'--reconstruct-params': 'lora' is not one of 'weights', 'spp', 'masked-lora'"),
        ("reconstruct lr 0", [*prune, "--method", "wanda", "--refine", "reconstruct", "--reconstruct-lr", "0"], "--reconstruct-lr: 0.0 is out of range"),
        ("true-sequential with wanda", [*prune, "--method", "wanda", "--true-sequential"], "--true-sequential: is a SparseGPT option"),
        ("forward grouped (was accepted)", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--forward", "grouped"], "'grouped' is not one of"),
        ("--teacher without objective distill", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--teacher", "{root}/dense"], "--teacher: applies to objective distill: set objective distill (--objective distill) or drop this option"),
        ("distill temperature 0", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--objective", "distill", "--distill-temperature", "0"], "--distill-temperature: 0.0 is out of range"),
        ("distill weight above 1", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--objective", "distill", "--distill-weight", "1.5"], "--distill-weight: 1.5 is out of range"),
        ("unknown finetune method", ["finetune", "{root}/dense", "--data", "{root}/calib.jsonl", "--out", "{root}/ft", "--method", "dora"], "'dora' is not one of"),
        ("eval bos maybe", ["eval", "{root}/dense", "--tasks", "wikitext2", "--bos", "maybe", "--out", "{root}/r.json"], "'maybe' is not one of"),
        ("recipe bos maybe", ["run", "{root}/bos.yaml", "--dry-run"], "stages[0] (eval).bos: 'maybe' is not one of auto, yes, no"),
        ("a finetune key on a prune stage", ["run", "{root}/good.yaml", "stages.prune.lr=1", "--dry-run"], "'lr' is a key of finetune stages"),
        ("dry run with a missing data file", ["run", "{root}/missing-data.yaml", "--dry-run"], "nowhere.jsonl"),
        ("eval with no tasks", ["eval", "{root}/dense", "--tasks", ",", "--out", "{root}/r.json"], "--tasks"),
        # evaluation that spreads (issue 23)
        ("eval --max-memory without --device-map", [*evaluate, "--max-memory", "cpu=1GB"], "--max-memory: applies only with a device map"),
        ("eval --offload-folder without --device-map", [*evaluate, "--offload-folder", "{root}/off"], "--offload-folder: applies only with a device map"),
        ("eval --max-memory not a size", [*evaluate, "--device-map", "auto", "--max-memory", "cpu=lots"], "--max-memory: 'lots' for device cpu is not a size"),
        ("eval --max-memory unknown device", [*evaluate, "--device-map", "auto", "--max-memory", "gpu0=1GB"], "--max-memory: device 'gpu0' is unknown"),
        ("eval --device-map unknown", [*evaluate, "--device-map", "everywhere"], "'everywhere' is not one of"),
        ("eval --device cuda with --device-map", [*evaluate, "--device", "cuda:1", "--device-map", "auto"], "--device: cuda:1 and a device map both place the model"),
        ("eval --device cpu with a GPU budget", [*evaluate, "--device", "cpu", "--device-map", "auto", "--max-memory", "0=1GB"], "--max-memory: 0=1GB names a GPU, but the device is cpu"),
        ("recipe max_memory mapping not a size", ["run", "{root}/max-memory.yaml", "--dry-run"], "stages[0] (eval).max_memory: 'lots' for device cpu is not a size"),
    ]


def snapshot(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def cases():
    from conftest import SOME_DATA

    return [pytest.param(argv, message, id=name) for name, argv, message in rows(SOME_DATA)]


@pytest.mark.parametrize("argv, message", cases())
def test_bad_input_is_one_clear_line(workspace, capsys, argv, message):
    before = snapshot(workspace)
    code, _, err = run_spp([part.format(root=workspace) for part in argv], capsys)
    assert code == 2, err
    *notes, error = err.splitlines()
    # one error line, last; a check of the data or the weights (nothing to preserve) follows the stage's memory plan
    # and loading notes
    assert error.startswith("spp: error: ") and all(n.startswith(("spp: loading ", "spp: plan: ")) for n in notes), err
    assert message in error, err
    assert "Traceback" not in err
    assert snapshot(workspace) == before  # nothing left behind, inputs untouched


def test_at_least_thirty_rows():
    """The one-clear-line test runs at least 30 distinct bad command lines, each with a message to look for."""
    (parametrize,) = [mark for mark in test_bad_input_is_one_clear_line.pytestmark if mark.name == "parametrize"]
    params = parametrize.args[1]
    assert len(params) >= 30
    assert len({tuple(param.values[0]) for param in params}) == len(params)  # no row repeats another's command
    assert len({param.id for param in params}) == len(params)
    assert all(param.values[1].strip() for param in params)  # an empty fragment would be found in any error


# ----------------------------------------------------------------------------------------------------------------
# OWL, DSnoT and MoE options through the Python API (the CLI options come from the schema)

API_ROWS = [
    # (id, keyword arguments of spp_cli.prune, a fragment of the one-line message)
    ("owl with N:M", dict(method="wanda", pattern="2:4", sparsity_profile="owl"),
     "sparsity_profile: owl needs pattern unstructured"),
    ("owl lambda 0", dict(method="wanda", sparsity_profile="owl", owl_lambda=0.0), "owl_lambda: 0.0 is out of range"),
    ("owl lambda 0.5", dict(method="wanda", sparsity_profile="owl", owl_lambda=0.5), "owl_lambda: 0.5 is out of range"),
    ("owl lambda negative", dict(method="sparsegpt", sparsity_profile="owl", owl_lambda=-0.1),
     "owl_lambda: -0.1 is out of range"),
    ("owl threshold 0", dict(method="wanda", sparsity_profile="owl", owl_threshold=0), "owl_threshold: 0 is out of"),
    ("owl threshold negative", dict(method="magnitude", sparsity_profile="owl", owl_threshold=-1.0),
     "owl_threshold: -1.0 is out of range"),
    ("owl lambda too wide for the sparsity", dict(method="wanda", sparsity=0.1, sparsity_profile="owl",
                                                  owl_lambda=0.3), "lower owl_lambda"),
    ("unknown sparsity profile", dict(method="wanda", sparsity_profile="layerwise"),
     "sparsity_profile: 'layerwise' is not one of uniform, owl"),
    ("dsnot with magnitude", dict(method="magnitude", refine="dsnot"), "refine: dsnot refines a wanda or sparsegpt"),
    ("dsnot with the wanda variant", dict(method="wanda", refine="dsnot", use_variant=True), "drop use_variant"),
    ("unknown refine", dict(method="wanda", refine="sparse-grow"), "refine: 'sparse-grow' is not one of none, dsnot, reconstruct"),
    ("reconstruct epochs 0", dict(method="wanda", refine="reconstruct", reconstruct_epochs=0),
     "reconstruct_epochs: 0 is out of range"),
    ("reconstruct options without reconstruct", dict(method="sparsegpt", refine="dsnot", reconstruct_lr=1e-3),
     "reconstruct_lr: applies to refine reconstruct"),
    ("masked-lora reconstruct after dsnot alone", dict(method="wanda", refine="dsnot", reconstruct_params="masked-lora"),
     "reconstruct_params: applies to refine reconstruct"),
    ("min_expert_tokens negative", dict(method="wanda", min_expert_tokens=-1), "min_expert_tokens: -1 is out of"),
]


@pytest.mark.parametrize("options, message", [pytest.param(o, m, id=name) for name, o, m in API_ROWS])
def test_bad_prune_option_through_the_api(workspace, options, message):
    import spp_cli
    from spp_cli.errors import BadInput

    before = snapshot(workspace)
    with pytest.raises(BadInput) as raised:
        spp_cli.prune(str(workspace / "dense"), workspace / "out", calib=str(workspace / "calib.jsonl"), nsamples=2,
                      seqlen=32, device="cpu", **options)
    assert "\n" not in str(raised.value) and message in str(raised.value), str(raised.value)
    assert snapshot(workspace) == before  # nothing published, nothing left behind
