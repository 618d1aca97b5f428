"""GFLOPS of one `F.linear` per dtype and shape on this machine, as JSON: what bounds a block's forward passes.

The shapes are the decoder linears of the prune benchmark's models (benchmarks/prune_peer.py): the random
hidden-1024 LLaMA (fp32), Gemma 3 270M (bf16) and the hidden-256 GQA LLaMA (fp16), at one window (256 rows) and
at spp's forward chunk (pruners.sequential.CHUNK_TOKENS rows). Each figure is 2*M*K*N / the mean seconds of the
calls made in --seconds.

  .venv/bin/python -m benchmarks.matmul --threads 2 --out benchmarks/results/matmul.json

--smoke: each shape timed for 0.01 s, at one window only.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import common

SHAPES = {  # label -> (dtype, [(in_features, out_features), ...])
    "llama-h1024 (fp32)": ("float32", [(1024, 1024), (1024, 2816), (2816, 1024)]),
    "gemma3-270m (bf16)": ("bfloat16", [(640, 1024), (640, 256), (1024, 640), (640, 2048), (2048, 640)]),
    "llama-h256-gqa (fp16)": ("float16", [(256, 256), (256, 64), (256, 688), (688, 256)]),
}


def gflops(rows: int, in_features: int, out_features: int, dtype, seconds: float) -> float:
    import torch

    x = torch.randn(rows, in_features).to(dtype)
    weight = torch.randn(out_features, in_features).to(dtype)
    torch.nn.functional.linear(x, weight)  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.nn.functional.linear(x, weight)
        calls += 1
    mean = (time.perf_counter() - start) / calls
    return round(2 * rows * in_features * out_features / mean / 1e9, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed calls per shape for this long")
    parser.add_argument("--out", default=None, help="default benchmarks/results/matmul.json")
    parser.add_argument("--smoke", action="store_true", help="0.01 s per shape, 256 rows only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds = 0.01
    import torch

    from pruners.sequential import CHUNK_TOKENS

    torch.set_num_threads(args.threads)
    results = []
    for label, (dtype_name, shapes) in SHAPES.items():
        dtype = getattr(torch, dtype_name)
        for in_features, out_features in shapes:
            for rows in (256,) if args.smoke else (256, CHUNK_TOKENS):
                value = gflops(rows, in_features, out_features, dtype, args.seconds)
                results.append({"model": label, "dtype": dtype_name, "rows": rows, "in_features": in_features,
                                "out_features": out_features, "gflops": value})
                print(f"{label} {rows}x{in_features} @ {in_features}x{out_features}: {value} GFLOPS", flush=True)
    report = {"benchmark": "F.linear GFLOPS per dtype and shape (benchmarks/matmul.py)",
              "machine": common.machine_info(threads=args.threads), "seconds_per_shape": args.seconds,
              "results": results, "created": common.timestamp()}
    common.write_json(report, args.out or common.default_out("matmul", args.smoke))


if __name__ == "__main__":
    main()
