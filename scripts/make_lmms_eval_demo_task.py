#!/usr/bin/env python
"""Write the offline lmms-eval task for the demo world: OUT/demo_vqa/{demo_vqa.yaml, utils.py, data/, images/}.

    python scripts/make_lmms_eval_demo_task.py OUT --samples 64
    HF_DATASETS_OFFLINE=1 lmms-eval --model recipe_search \\
        --model_args pretrained=demo,recipe=recipes/demo-fitprune-50pct.json \\
        --include_path OUT/demo_vqa --tasks demo_vqa --batch_size 16

The questions are the first N held-out demo questions, the ones `search-recipe eval --eval-samples N`
measures (see recipe_search/integrations/demo_task.py and docs/lmms-eval.md).
"""
from __future__ import annotations

import argparse
import sys

from recipe_search.integrations.demo_task import write_demo_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write demo_vqa/ into")
    p.add_argument("--samples", type=int, default=64, help="held-out questions (default: 64)")
    args = p.parse_args(argv)
    if args.samples <= 0:
        p.error(f"--samples must be positive, got {args.samples}")
    folder = write_demo_task(args.out, args.samples)
    print(f"wrote {folder} ({args.samples} questions); run lmms-eval with --include_path {folder} --tasks demo_vqa")
    return 0


if __name__ == "__main__":
    sys.exit(main())
