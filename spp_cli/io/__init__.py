"""What spp reads and writes on disk: checkpoints and their spp.json, written atomically, never over a user's file.

    checkpoint.py      load a model (builtin, folder, hub id), save a checkpoint + spp.json atomically
    manifest.py        spp.json's records: layers' zero and weight hashes, the stage manifest
    stored_weights.py  one tensor at a time from safetensors files (memory-mapped)
    safetensors_header.py  a safetensors file's header (names, dtypes, shapes, offsets) without torch
    atomic.py          staging siblings, publish by rename, stale leftovers
    outputs.py         where a stage may write: skip a finished result, refuse what is not spp's
    ownership.py       which files spp wrote (.spp-written.json), so a user's are never replaced
"""
