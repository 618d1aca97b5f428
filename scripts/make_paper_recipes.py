"""Write the paper-reproduction recipes (recipes/paper/*.yaml): one per model and sparsity setting.

    python scripts/make_paper_recipes.py

Each recipe prunes the dense model with Wanda and with SparseGPT (128 C4 windows at the paper's seqlen),
SPP-tunes both on Alpaca-GPT4 with spec/spp-method.md §2's settings, and evaluates dense, pruned and tuned
models on WikiText-2 token perplexity and the 7 zero-shot tasks.

The papers' protocol is pinned where spp's defaults differ (docs/fidelity.md): one Alpaca-templated example per
record (data_format: alpaca, although the hub's alpaca-gpt4 rows also carry `text`), fp16 AMP (dtype: float16),
the loss averaged per micro-batch (loss_normalization: micro_batch) and zero-shot prompts without BOS (bos: "no",
quoted because YAML 1.1 reads a bare no as false).
"""

from pathlib import Path

MODELS = {
    "llama-7b": ("huggyllama/llama-7b", 2048),  # LLaMA-1: SparseGPT's and Wanda's seqlen 2048
    "llama2-7b": ("meta-llama/Llama-2-7b-hf", 4096),  # LLaMA-2: Wanda's tables use max_position_embeddings
}
SETTINGS = {
    "50": ("unstructured", 0.5),
    "60": ("unstructured", 0.6),
    "70": ("unstructured", 0.7),
    "75": ("unstructured", 0.75),
    "2of4": ("2:4", None),
    "4of8": ("4:8", None),
}
TASKS = "[wikitext2, boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa]"


def recipe(model: str, seqlen: int, pattern: str, sparsity: float | None, name: str) -> str:
    sparsity_line = f"    sparsity: {sparsity}\n" if sparsity is not None else ""
    stages = []
    for method in ("wanda", "sparsegpt"):
        stages.append(f"""  - name: prune-{method}
    type: prune
    input: dense
    method: {method}
    pattern: "{pattern}"
{sparsity_line}    calib: c4
    nsamples: 128
    seqlen: {seqlen}
  - name: spp-{method}
    type: finetune
    input: prune-{method}
    method: spp
    data: alpaca-gpt4
    data_format: alpaca
    epochs: 3
    lr: 4.0e-3
    batch_size: 128
    micro_batch_size: 8
    seqlen: 512
    val_size: 2000
    seed: 42
    dtype: float16
    loss_normalization: micro_batch
""")
    setting = f"{pattern}{f' {sparsity:.0%}' if sparsity else ''}"
    return f"""# {name}: Wanda and SparseGPT at {setting} on {model}, SPP on Alpaca-GPT4,
# evaluated as in the papers (WikiText-2 token ppl @{seqlen}, 7 zero-shot tasks + PIQA, no BOS in the prompts).
# fp16 AMP, per-micro-batch loss and Alpaca-templated examples as SPP's finetune.py (docs/fidelity.md).
# Made by scripts/make_paper_recipes.py.
# Needs the Hub (or a local copy: override model=/path and the data sources) and a GPU with ~24 GB.
#   spp run recipes/paper/{name}.yaml
model: {model}
output_dir: ../../runs/{name}
seed: 0
stages:
{"".join(stages)}  - name: eval
    type: eval
    models: [dense, prune-wanda, spp-wanda, prune-sparsegpt, spp-sparsegpt]
    tasks: {TASKS}
    seqlen: {seqlen}
    batch_size: 8
    bos: "no"
"""


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "recipes" / "paper"
    out.mkdir(parents=True, exist_ok=True)
    for model_key, (model, seqlen) in MODELS.items():
        for setting, (pattern, sparsity) in SETTINGS.items():
            name = f"{model_key}-{setting}"
            (out / f"{name}.yaml").write_text(recipe(model, seqlen, pattern, sparsity, name))


if __name__ == "__main__":
    main()
