"""Evaluation: the papers' token perplexity, lm-eval zero-shot tasks, and the offline task bundle.

    engine.py      evaluate(model, tokenizer, tasks, ...) -> one model's results object; validate_tasks
    perplexity.py  token perplexity in non-overlapping windows (SparseGPT/Wanda's eval_ppl) and its streams
    zeroshot.py    the lm-eval bridge: the bundle, the BOS rule (bos auto|yes|no), mean_acc_7
    quiet.py       lm-eval's console noise silenced unless verbose
    hub.py         offline detection and the exceptions that mean "could not download"
    tasks/         the offline lm-eval YAMLs (README.md: which prompts equal lm-eval's)

results.json (written by spp_cli/stages/evaluate.py) has one layout for one model and for many:
{"schema_version": 1, "models": {name: results object}, "config", "notes", "fingerprint"}, documented field by
field in docs/results-json.md. Nothing here prints: progress goes through on_progress(done, total, label).
"""
