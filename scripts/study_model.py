"""The model the device's recovery study runs on (scripts/device_study.sh), saved as a plain HF checkpoint.

  python scripts/study_model.py gguf FILE.gguf OUT [--dtype float32] [--tokenizer DIR]
      Gemma 3 270M from its Q4_K_M GGUF, as ../shared/models/gguf_to_hf.py makes it (transformers' GGUF reader,
      dequantized, every weight rounded to bfloat16), stored in --dtype. float32 holds the same bf16 values, so the
      model is the CPU runs' one, and no fine-tune's update is rounded away when merged into a bf16 checkpoint.
      --tokenizer DIR: take the tokenizer files from DIR (`NAME` or `NAME.xz`) instead of converting the GGUF's:
      transformers 5.17 (the GPU image's) converts Gemma's GGUF vocabulary into a tokenizer that splits WikiText-2
      into 4.4x as many tokens as the one 5.25 makes; the files 5.25 wrote tokenize identically under both.
  python scripts/study_model.py random CONFIG.json OUT [--blocks N] [--vocab V]
      Random weights in that config's shape (the probe: the real model's costs before its weights arrive), with the
      shipped tiny model's tokenizer (its ids fit any vocabulary of at least 4096).
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def from_gguf(source: Path, out: Path, dtype: str, tokenizer_files: Path | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = source.parent, source.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    model = type(quantized)(type(quantized.config)(**config))
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.to(torch.bfloat16).to(getattr(torch, dtype)).save_pretrained(out)
    if tokenizer_files is None:
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
        return
    for path in tokenizer_files.iterdir():
        if path.suffix == ".xz":
            (out / path.stem).write_bytes(lzma.decompress(path.read_bytes()))
        else:
            shutil.copy2(path, out / path.name)


def random_model(config_file: Path, out: Path, blocks: int | None, vocab: int | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from spp_cli.io.checkpoint import BUILTIN_MODELS

    sizes = json.loads(config_file.read_text())
    if blocks:
        sizes["num_hidden_layers"] = blocks
        sizes["layer_types"] = sizes.get("layer_types", [])[:blocks] or None
    if vocab:
        sizes["vocab_size"] = vocab
    config = AutoConfig.for_model(**{key: value for key, value in sizes.items() if value is not None})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(BUILTIN_MODELS["tiny-llama"] / name, out / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("gguf", "random"))
    parser.add_argument("source", type=Path, help="the GGUF file, or the config.json to take the shape of")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="gguf: the tokenizer files' folder")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    args = parser.parse_args(argv)
    if args.kind == "gguf":
        from_gguf(args.source, args.out, args.dtype, args.tokenizer)
    else:
        random_model(args.source, args.out, args.blocks, args.vocab)
    print(f"study model -> {args.out}")


if __name__ == "__main__":
    main()
