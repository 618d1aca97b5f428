"""How loading renames a stored key: every renaming in turn, then at most one converter (transformers'
rename_source_key order). Built on each transform's own `rename_source_key`, which every transformers 5.x has; the
module-level helpers transformers later added for this (apply_renamings, apply_converters) are not in 5.17."""

from __future__ import annotations


def renamed_key(key: str, renamings: list) -> str:
    """`key` after every WeightRenaming in `renamings`, in turn (they may chain)."""
    for renaming in renamings:
        key = renaming.rename_source_key(key)[0]
    return key


def converted_key(key: str, converters: list) -> tuple[str, str | None]:
    """(`key` after the first WeightConverter of `converters` that matches it, the source pattern that matched);
    (`key`, None) when none does."""
    for converter in converters:
        target, pattern = converter.rename_source_key(key)
        if pattern is not None:
            return target, pattern
    return key, None
