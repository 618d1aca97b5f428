"""Save a model of a real shape with random weights (spp_cli/bench/shapes.py) and the shipped tiny model's tokenizer,
as a stand-in checkpoint: `spp run recipes/gpu-check.yaml` prunes and tunes a LLaMA-7B-shaped one on a GPU.

    python scripts/make_shape_model.py --shape llama-7b --blocks 2 --dtype bfloat16 --out /tmp/llama-7b-2
"""

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # vocabulary 4096: fits every shape's embedding


def main(argv: list[str] | None = None) -> None:
    import torch

    from spp_cli.bench.shapes import SHAPES, random_shape_model
    from spp_cli.io.checkpoint import BUILTIN_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=list(SHAPES))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    model = random_shape_model(args.shape, args.blocks, args.device, getattr(torch, args.dtype), args.seed)
    del model.config.spp_real_depth  # the bench's note, not part of a checkpoint
    model.to("cpu").save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy2(BUILTIN_MODELS["tiny-llama"] / name, args.out / name)
    print(f"wrote {args.out}: shape {args.shape}, {args.blocks} blocks, {args.dtype}")


if __name__ == "__main__":
    main()
