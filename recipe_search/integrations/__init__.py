"""Bridges to evaluation harnesses.

- `runner`: a pruned model behind a harness-neutral API (load, apply a recipe, generate, score);
  no harness import.
- `demo_task`: writes an offline lmms-eval task for the embedded demo world; no harness import.
- `lmms_eval`: the lmms-eval model `recipe_search` (the only module that imports lmms_eval; loaded
  by lmms-eval through the `lmms_eval.models` entry point).
"""
