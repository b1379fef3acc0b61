#!/usr/bin/env bash
# CI stage: the real lmms-eval harness on the demo model, checked against `search-recipe eval`.
#
# lmms-eval lives in its own virtualenv, never in the main one. Two installs (LMMS_EVAL_INSTALL):
#   light (default)  torch 2.13.0 CPU (the main environment's build) + lmms-eval 0.7.3, torchvision
#                    removed: PyPI's torchvision is built against CUDA torch and cannot load with the
#                    CPU build, and nothing on this path imports it. About 2.5 GB, ~3 min.
#   full             torch 2.14.1 + torchvision 0.29.1 (the CUDA build pip picks) + lmms-eval 0.7.3:
#                    what `pip install lmms-eval` gives. About 7 GB, ~6 min.
# The venv is reused when a complete one of the same recipe exists (LMMS_EVAL_VENV, default under
# ~/.cache/recipe-search/); otherwise it is built from scratch. This checkout is installed into it
# (editable) on every run, and the `lmms_eval.models` entry point is registered by a shim package
# unless recipe-search's own metadata declares it.
#
# Then `python -m recipe_search.integrations.demo_check` writes the offline demo task, runs the
# `lmms-eval` CLI (chat class, unpruned baseline, --force_simple, multiple choice) and
# `search-recipe eval`, and exits non-zero unless the accuracies are equal.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

MODE="${LMMS_EVAL_INSTALL:-light}"
LMMS_EVAL_VERSION="0.7.3"
case "$MODE" in
    light) RECIPE="light lmms-eval==$LMMS_EVAL_VERSION torch==2.13.0 torchvision-removed filelock<4" ;;
    full) RECIPE="full lmms-eval==$LMMS_EVAL_VERSION torch==2.14.1 torchvision==0.29.1 filelock<4" ;;
    *) echo "lmms-eval stage: LMMS_EVAL_INSTALL must be light or full, got '$MODE'" >&2; exit 2 ;;
esac
VENV="${LMMS_EVAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recipe-search/lmms-eval-venv-$MODE}"
SAMPLES="${LMMS_EVAL_SAMPLES:-64}"
RECIPE_FILE="${LMMS_EVAL_RECIPE:-recipes/demo-fitprune-50pct.json}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lmms-eval-stage.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip, quiet, without the warning this machine's pip config prints for each package it looks up
# (with pipefail the pipeline fails when pip does)
pipq() {
    "$PY" -m pip "$@" -q 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

start=$(date +%s)
if [ -f "$VENV/.recipe-search-venv" ] && [ "$(cat "$VENV/.recipe-search-venv")" = "$RECIPE" ] \
        && "$PY" -c "import lmms_eval, torch" >/dev/null 2>&1; then
    echo "lmms-eval stage: reusing $VENV ($RECIPE)"
else
    echo "lmms-eval stage: building $VENV ($RECIPE)"
    if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
        echo "lmms-eval stage: $VENV exists and is not a virtualenv; refusing to replace it" >&2
        exit 2
    fi
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python -m venv "$VENV"
    if [ "$MODE" = light ]; then
        pipq install torch==2.13.0
        # torchvision 0.28.0 is torch 2.13's: naming it keeps pip from replacing torch; then it goes
        pipq install "lmms-eval==$LMMS_EVAL_VERSION" "filelock<4" torch==2.13.0 torchvision==0.28.0
        pipq uninstall -y torchvision
    else
        pipq install torch==2.14.1 torchvision==0.29.1
        pipq install "lmms-eval==$LMMS_EVAL_VERSION" "filelock<4" torch==2.14.1 torchvision==0.29.1
    fi
    echo "$RECIPE" > "$VENV/.recipe-search-venv"
fi
# this checkout, without extras (an `lmms-eval` extra would bring torchvision back in light mode)
pipq install -e "$ROOT"

has_own_entry_point() {
    "$PY" - <<'EOF'
import sys
from importlib.metadata import distribution
eps = distribution("recipe-search").entry_points
sys.exit(0 if any(e.group == "lmms_eval.models" and e.name == "recipe_search" for e in eps) else 1)
EOF
}
if has_own_entry_point; then
    "$PY" -m pip uninstall -q -y recipe-search-lmms-eval-entrypoint >/dev/null 2>&1 || true
else
    # until pyproject.toml declares [project.entry-points."lmms_eval.models"], a shim package does
    mkdir -p "$WORK/entrypoint"
    cat > "$WORK/entrypoint/pyproject.toml" <<'EOF'
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "recipe-search-lmms-eval-entrypoint"
version = "0.1.0"
description = "Registers recipe_search's lmms-eval model (until recipe-search declares the entry point)"

[project.entry-points."lmms_eval.models"]
recipe_search = "recipe_search.integrations.lmms_eval:manifest"

[tool.setuptools]
py-modules = []
EOF
    pipq install --no-build-isolation "$WORK/entrypoint"
fi
"$PY" -c "from lmms_eval.models import get_model; print('lmms-eval stage: model recipe_search ->', get_model('recipe_search').__name__)"
echo "lmms-eval stage: venv ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1); torch $("$PY" -c 'import torch; print(torch.__version__)')"

"$PY" -m recipe_search.integrations.demo_check --recipe "$RECIPE_FILE" --samples "$SAMPLES" --work "$WORK/check"
echo "lmms-eval stage: done in $(( $(date +%s) - start )) s"
