"""Write tests/fixtures/data/: a few KB cut from the public test data, laid out like ../shared/data.

The suite runs its data-path tests (calibration windows, the Alpaca template, the offline zero-shot tasks,
WikiText-2 perplexity) on these files when the full data is not beside the clone. Each fixture keeps the path of
its source file and holds only that file's first records, unchanged (C4 documents are also cut to their first
2000 characters); tests/fixtures/data/SOURCES.md names every source and its sha256.

    python scripts/make_test_fixtures.py [--source ../shared/data] [--out tests/fixtures/data]

Deterministic: rerunning it on the same source rewrites the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C4 = "c4/c4-train.00000-of-01024.first1000.jsonl"
ALPACA = "alpaca/alpaca_small.json"
WIKITEXT2 = "wikitext-2-raw-v1/test.jsonl"
C4_DOCUMENTS, C4_CHARACTERS = 8, 2000
ALPACA_RECORDS = 32
WIKITEXT2_ROWS = 40
TASK_RECORDS = 8  # per zero-shot task: more than the tests' --limit
TASK_FILES = ("boolq/boolq.jsonl", "hellaswag/hellaswag_val.jsonl", "winogrande/winogrande.jsonl",
              "arc_easy/arc_easy.jsonl", "arc_challenge/arc_challenge.jsonl", "openbookqa/openbook_qa.jsonl",
              "piqa/piqa.jsonl")
RTE_PARQUET, RTE_TSV = "rte/validation.parquet", "rte/dev.tsv"
FOUNDRY = "mosaicml/llm-foundry@8c8dd48f72168c5d51e2f7b151595892a8fba43d scripts/eval/local_data/"
# where each source file comes from (../shared/data/SOURCES.md has the full provenance): repository@commit path,
# and the license of the original dataset
ORIGINS = {
    ALPACA: ("Antelofski/alpaca-lora@4247f486ca5751371a19fcec5061da437344824f alpaca_small.json",
             "ODC-By (repo); Stanford Alpaca CC BY-NC 4.0"),
    C4: ("Diffusion-bachelor/diffusion-data-constraint-rare-events@3305ae85ae51f4882f291ff894d49946af655a11 "
         "data/c4_sample.jsonl (allenai/c4 en train shard 0, first 1000 documents)", "ODC-BY"),
    WIKITEXT2: ("DRAGNLabs/LLMHumanModeling@a76c47739e890a857b138b0adc5ca47a10c4c18f data/wiki.test.raw, "
                "one row per line (HF wikitext-2-raw-v1 test)", "CC BY-SA 3.0 / GFDL"),
    "boolq/boolq.jsonl": (FOUNDRY + "reading_comprehension/boolq.jsonl", "CC BY-SA 3.0"),
    "hellaswag/hellaswag_val.jsonl": ("klosax/hellaswag_text_data@1105d370f8340eac3c63a91fd1fa58e8999f9505 "
                                      "hellaswag_val_full.txt.bz2, as {query, choices, gold}", "MIT"),
    "winogrande/winogrande.jsonl": (FOUNDRY + "language_understanding/winogrande.jsonl", "CC-BY / Apache-2.0"),
    "arc_easy/arc_easy.jsonl": (FOUNDRY + "world_knowledge/arc_easy.jsonl", "CC BY-SA 4.0"),
    "arc_challenge/arc_challenge.jsonl": (FOUNDRY + "world_knowledge/arc_challenge.jsonl", "CC BY-SA 4.0"),
    "openbookqa/openbook_qa.jsonl": (FOUNDRY + "commonsense_reasoning/openbook_qa.jsonl", "Apache-2.0"),
    "piqa/piqa.jsonl": (FOUNDRY + "commonsense_reasoning/piqa.jsonl", "AFL-3.0"),
    RTE_TSV: ("Ji-Yishan/MIEC-FYP@250635701007f7f2dc00b63ce2cbc3dfe104b4e0 RTE/dev.tsv (GLUE RTE validation)",
              "GLUE RTE, research use"),
    RTE_PARQUET: ("Ji-Yishan/MIEC-FYP@250635701007f7f2dc00b63ce2cbc3dfe104b4e0 RTE/validation.parquet",
                  "GLUE RTE, research use"),
}


def first_lines(path: Path, count: int) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return list(itertools.islice(handle, count))


def write_fixtures(source: Path, out: Path) -> list[tuple[str, str]]:
    """Write every fixture under `out`; returns (relative path, what it holds) for SOURCES.md."""
    written = []

    def write(relative: str, text: str, holds: str) -> None:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text(text, encoding="utf-8")
        written.append((relative, holds))

    alpaca = json.loads((source / ALPACA).read_text(encoding="utf-8"))[:ALPACA_RECORDS]
    write(ALPACA, json.dumps(alpaca, indent=4, ensure_ascii=False) + "\n", f"the first {ALPACA_RECORDS} records")
    c4 = [json.loads(line) for line in first_lines(source / C4, C4_DOCUMENTS)]
    c4 = [{**document, "text": document["text"][:C4_CHARACTERS]} for document in c4]
    write(C4, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in c4),
          f"the first {C4_DOCUMENTS} documents, each text cut to its first {C4_CHARACTERS} characters")
    write(WIKITEXT2, "".join(first_lines(source / WIKITEXT2, WIKITEXT2_ROWS)), f"the first {WIKITEXT2_ROWS} rows")
    for relative in TASK_FILES:
        write(relative, "".join(first_lines(source / relative, TASK_RECORDS)), f"the first {TASK_RECORDS} records")
    write(RTE_TSV, "".join(first_lines(source / RTE_TSV, TASK_RECORDS + 1)),
          f"the header and the first {TASK_RECORDS} rows")
    import pyarrow.parquet as parquet

    table = parquet.read_table(source / RTE_PARQUET).slice(0, TASK_RECORDS)  # keeps HF's ClassLabel metadata
    parquet.write_table(table, out / RTE_PARQUET)
    written.append((RTE_PARQUET, f"the first {TASK_RECORDS} rows (HF's schema metadata kept)"))
    return written


def sources_markdown(source: Path, written: list[tuple[str, str]]) -> str:
    lines = [
        "# tests/fixtures/data — what each file is cut from",
        "",
        "Written by `python scripts/make_test_fixtures.py` (do not edit by hand) from the public test data laid",
        "out like ../shared/data (its SOURCES.md has the full provenance). Every fixture has the same path as",
        "the file it is cut from and holds only that file's first records; the sha256 is the whole source file's.",
        "",
        "| file | holds | cut from (repository@commit path) | dataset license | source sha256 |",
        "|---|---|---|---|---|",
    ]
    for relative, holds in written:
        digest = hashlib.sha256((source / relative).read_bytes()).hexdigest()
        origin, license_name = ORIGINS[relative]
        lines.append(f"| {relative} | {holds} | {origin} | {license_name} | {digest} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "data")
    args = parser.parse_args()
    written = write_fixtures(args.source, args.out)
    (args.out / "SOURCES.md").write_text(sources_markdown(args.source, written), encoding="utf-8")


if __name__ == "__main__":
    main()
