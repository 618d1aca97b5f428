"""The prune stage's recorded options (spp.json "config", the fingerprint) and its checks against the driver's."""

import dataclasses
import itertools

import pytest

from pruners.errors import PrunerOptionError
from pruners.masks import parse_pattern
from pruners.options import PruneOptions
from spp_cli.errors import BadInput
from spp_cli.io.outputs import fingerprint
from spp_cli.recipe.resolve import validate_options
from spp_cli.recipe.schema import REFINES, STAGE_TYPES, PruneStage
from spp_cli.stages.prune import recorded_options


def options_before_the_rule(stage, pattern) -> dict:
    """The hand-built dict spp_cli/stages/prune.py made before recorded_options (commit 64e02f8), copied verbatim:
    every earlier run's manifest and fingerprint depend on it."""
    method, calib, nsamples, seed, dtype = stage.method, stage.calib, stage.nsamples, stage.seed, stage.dtype
    sparsity_pattern = pattern
    needs_calibration = method != "magnitude" or stage.sparsity_profile == "owl"
    options = {
        "method": method,
        "sparsity": sparsity_pattern.sparsity,
        "pattern": str(sparsity_pattern),
        "calib": calib if needs_calibration else None,
        "nsamples": nsamples if needs_calibration else None,
        "seqlen": stage.seqlen,
        "seed": seed,
        "targets": stage.targets,
        "ignore": stage.ignore,
        "use_variant": stage.use_variant,
        "true_sequential": stage.true_sequential,
        "dtype": dtype,
    }
    if stage.sparsity_profile != "uniform":
        options |= {"sparsity_profile": stage.sparsity_profile, "owl_threshold": stage.owl_threshold,
                    "owl_lambda": stage.owl_lambda}
    if stage.refine != "none":
        options["refine"] = stage.refine
    if stage.min_expert_tokens != 16:
        options["min_expert_tokens"] = stage.min_expert_tokens
    return options


CASES = [
    dict(method="magnitude"),  # calib and nsamples recorded as None
    dict(method="magnitude", sparsity=0.7, calib="builtin:python-docs", nsamples=8, seqlen=128),
    dict(method="magnitude", sparsity_profile="owl"),  # OWL reads data: calib and nsamples recorded
    dict(method="wanda", sparsity_profile="owl"),  # OWL's defaults still recorded with the profile
    dict(method="wanda", sparsity_profile="owl", owl_threshold=3.0, owl_lambda=0.1, seqlen=256, seed=3),
    dict(method="wanda", owl_threshold=3.0, owl_lambda=0.1),  # OWL values without OWL: not recorded
    dict(method="wanda", pattern="2:4", use_variant=True, targets="mlp", ignore="down_proj"),
    dict(method="sparsegpt", refine="dsnot", true_sequential=True, pattern="4:8", dtype="bfloat16"),
    dict(method="sparsegpt", pattern="2:4", sparsity=0.5, streaming="off", device="cpu"),
    dict(method="wanda", min_expert_tokens=8),
    dict(method="wanda", min_expert_tokens=16),  # the default given explicitly: not recorded
    dict(method="wanda", min_expert_tokens=0, refine="dsnot", sparsity_profile="owl", sparsity=0.6),
]


@pytest.mark.parametrize("options", CASES, ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()))
def test_recorded_options_are_the_hand_built_dict_key_for_key_and_in_order(options):
    stage = validate_options(PruneStage, options)
    pattern = parse_pattern(stage.pattern, stage.sparsity)
    expected = options_before_the_rule(stage, pattern)
    recorded = recorded_options(stage, pattern)
    assert list(recorded.items()) == list(expected.items())  # the order too: spp.json is written unsorted
    assert fingerprint(recorded, "parent") == fingerprint(expected, "parent")


@pytest.mark.parametrize("stage_type", list(STAGE_TYPES.values()), ids=lambda cls: cls.TYPE)
def test_what_a_stage_leaves_out_of_its_record_are_its_own_keys(stage_type):
    """Stage.recorded_options' rule names only real keys (a misspelt one would silently record it)."""
    keys = {f.name for f in dataclasses.fields(stage_type)}
    when_set = {name for key, companions in stage_type.RECORDED_WHEN_SET.items() for name in (key, *companions)}
    assert set(stage_type.NOT_RECORDED) <= keys and when_set <= keys
    assert not set(stage_type.NOT_RECORDED) & when_set


def test_magnitude_records_exactly_these_options():
    stage = validate_options(PruneStage, dict(method="magnitude", min_expert_tokens=8))
    assert recorded_options(stage, parse_pattern("unstructured", 0.5)) == {
        "method": "magnitude", "sparsity": 0.5, "pattern": "unstructured", "calib": None, "nsamples": None,
        "seqlen": None, "seed": 0, "targets": None, "ignore": None, "use_variant": False, "true_sequential": False,
        "dtype": "auto", "min_expert_tokens": 8,
    }


def _schema_accepts(options: dict) -> bool:
    try:
        validate_options(PruneStage, options)
    except BadInput:
        return False
    return True


def _driver_accepts(options: dict) -> bool:
    pattern = parse_pattern(options["pattern"], None if ":" in options["pattern"] else 0.5)
    try:
        PruneOptions(options["method"], pattern, **{k: v for k, v in options.items() if k not in ("method", "pattern")}
                     ).check()
    except PrunerOptionError:
        return False
    return True


def test_the_schema_and_the_driver_accept_the_same_option_combinations():
    grid = itertools.product(("magnitude", "wanda", "sparsegpt"), (False, True), (False, True), REFINES,
                             ("uniform", "owl"), ("unstructured", "2:4"), ((5.0, 0.08), (0.0, 0.08), (5.0, 0.5)),
                             (16, 0))
    checked = 0
    for method, variant, sequential, refine, profile, pattern, (threshold, lam), tokens in grid:
        options = dict(method=method, use_variant=variant, true_sequential=sequential, refine=refine,
                       sparsity_profile=profile, pattern=pattern, owl_threshold=threshold, owl_lambda=lam,
                       min_expert_tokens=tokens)
        assert _schema_accepts(options) == _driver_accepts(options), options
        checked += _schema_accepts(options)
    assert checked > 20  # the grid holds accepted combinations, not only refusals
    assert not _schema_accepts(dict(method="wanda", true_sequential=True, pattern="unstructured"))
    assert not _schema_accepts(dict(method="sparsegpt", use_variant=True, pattern="unstructured"))
