"""Recipes: the one definition of every stage's options, and how a YAML recipe becomes validated stages.

    schema.py    the stage dataclasses: every key's kind, range, default and help (CLI, recipe, API, fingerprint)
    loader.py    the YAML 1.2 loader (4e-3 is a float, a bare 2:4 is refused)
    values.py    one value read against its option
    resolve.py   a recipe file (or a command's keywords) into validated stages: load_recipe, validate_options
"""
