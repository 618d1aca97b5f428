"""Fine-tuning on transformers' Trainer: the run itself, the adapter-aware Trainer, and its progress events.

    trainer.py          options -> TrainingArguments, the run
    result.py           what a run produced (FinetuneResult), the adapters on a fresh or weightless base, the merge
    adapter_trainer.py  the Trainer subclass (adapter-only checkpoints, loss normalization) and resume
    progress.py         TrainerCallback that reports each optimizer step as an event
    run_record.py       what a run records about how it ran: what it applied, its memory, its parallelism
"""
