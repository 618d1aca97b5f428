"""What every benchmark shares: paths, random LLaMAs, peak RSS, machine info, the peer's venv, writing JSON.

Only the standard library is imported at module level (torch and transformers inside the functions that need them),
so a worker that imports this still measures its own import time, and the llm-compressor peer, which runs in its
own venv, can use the RSS reader.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"  # where every benchmark writes by default
SMOKE_RESULTS = RESULTS / "smoke"  # --smoke runs write here by default (not committed)
SHARED = REPO.parent / "shared"
SHARED_DATA = Path(os.environ.get("SPP_TEST_DATA", SHARED / "data"))
TINY = "builtin:tiny-llama"
TINY_DIR = REPO / "spp_cli" / "assets" / "tiny-llama"
PEER_VENV = ".bench-venvs/llmcompressor"
PEER_VERSION = "0.14.0.1"
PEER_REQUIREMENTS = ("torch==2.13.0", f"llmcompressor=={PEER_VERSION}")  # installed in this order, one pip call each

# random-init LLaMA shapes (LlamaConfig keyword arguments); every builder seeds torch with 0 first
LLAMA_SHAPES = {
    "h1024": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    # the shape of the trained model: 2 KV heads, fp16 on disk
    "h256-gqa": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "h256": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
    # --smoke: every projection's widths divisible by 16, vocab the tiny model's tokenizer fits in
    "h64": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
}


def llama_config(shape: str, **overrides):
    """transformers.LlamaConfig of LLAMA_SHAPES[shape], with `overrides` (e.g. num_hidden_layers) on top."""
    import transformers

    return transformers.LlamaConfig(**{**LLAMA_SHAPES[shape], **overrides})


def random_llama(shape: str, dtype=None, **overrides):
    """A random-init LlamaForCausalLM (torch seed 0) in eval mode; `dtype` a torch dtype or None (fp32)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(shape, **overrides)).eval()
    return model if dtype is None else model.to(dtype)


def save_random_llama(directory: Path, shape: str, dtype=None, tokenizer_from: Path = TINY_DIR,
                      **overrides) -> Path:
    """random_llama(shape, dtype, **overrides) saved as save_pretrained does, with the tiny model's tokenizer files
    (so a tool that loads a tokenizer, or draws calibration windows, can)."""
    random_llama(shape, dtype, **overrides).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_from / name, directory / name)
    return directory


def process_status_mb(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of this process image, in MB (nan where /proc is missing).

    The peak is read here rather than from ru_maxrss, which Linux carries across exec: a child spawned by a driver
    holding a model would report at least the driver's RSS."""
    return process_status_kib(field) / 1024


def process_status_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    return process_status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def machine_info(**extra) -> dict:
    """The machine a report was measured on: CPUs, threads, platform, versions and the load average now."""
    info = {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "python": platform.python_version()}
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = module.__version__
    return {**info, **extra, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}


def run_child(code: str, options: dict, scratch: Path) -> tuple[float, dict | None, list[str]]:
    """`code` in a fresh interpreter (the repo importable) with `options` as JSON in argv[1]; `scratch` removed
    after. (seconds, the JSON its last stdout line holds, []), or (seconds, None, its last stderr line) on failure."""
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code, json.dumps(options)], cwd=REPO, capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    if completed.returncode != 0:
        return seconds, None, completed.stderr.strip().splitlines()[-1:]
    return seconds, json.loads(completed.stdout.strip().splitlines()[-1]), []


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def default_out(name: str, smoke: bool = False) -> str:
    """benchmarks/results/NAME.json (benchmarks/results/smoke/NAME.json for a --smoke run)."""
    return str((SMOKE_RESULTS if smoke else RESULTS) / f"{name}.json")


def write_json(report: dict, out: str | Path, announce: bool = True) -> Path:
    """Write `report` as indented JSON to `out` (its folder made), and say where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if announce:
        print(f"wrote {path}", flush=True)
    return path


def peer_probe(python: Path) -> bool:
    """Whether `python` imports llmcompressor at the pinned version."""
    probe = [str(python), "-c", f"import llmcompressor, sys; sys.exit(llmcompressor.__version__ != {PEER_VERSION!r})"]
    return Path(python).exists() and subprocess.run(probe, capture_output=True).returncode == 0


def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python; create the venv (torch CPU wheel first, then llmcompressor) unless it works already."""
    python = venv / "bin" / "python"
    if peer_probe(python):
        return python
    print(f"creating the llm-compressor venv at {venv} (once; later runs reuse it)", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    # torch goes first, pinned: a bare `torch` requirement resolved by llmcompressor would pull a CUDA build
    for requirement in PEER_REQUIREMENTS:
        subprocess.run([str(python), "-m", "pip", "install", requirement], check=True)
    if not peer_probe(python):
        raise SystemExit(f"{venv}: llmcompressor {PEER_VERSION} does not import after installing; remove the venv "
                         "and retry")
    return python


def find_peer_python(peer_python: str | None, peer_venv: str, smoke: bool) -> Path | None:
    """The interpreter for the llm-compressor peer: --peer-python, else the venv (made on first use). A --smoke run
    never installs anything: it uses the peer only when one is there already, and returns None otherwise."""
    if peer_python:
        return Path(peer_python)
    venv = REPO / peer_venv
    if smoke:
        return venv / "bin" / "python" if peer_probe(venv / "bin" / "python") else None
    return ensure_peer_venv(venv)
