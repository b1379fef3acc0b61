"""Fuzz test of the recipe loader: seeded mutants of a shipped recipe either load and apply cleanly
(one forward through the untrained demo model, the scheduled counts kept, a lossless save) or are
refused by `load_recipe` with a RecipeError of one printable line that names the field.

A mutant that loads may still be refused by `apply_recipe`, for what only the model can tell (e.g.
an encoder layer deeper than the tower): that too must be one line naming the field.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from recipe_search import RecipeError, apply_recipe, load_recipe, save_recipe
from recipe_search.calibration import demo_samples
from recipe_search.runtime.selection import RULES, ScoringRule

SHIPPED = Path(__file__).parent.parent / "recipes" / "demo-fitprune-50pct.json"
N_MUTANTS = 600
SEED = 20261124
N = 144  # the demo's visual tokens per image

# A path to the field, then ": " (a cut path ends in "..."); or a problem with the bytes themselves.
NAMES_A_FIELD = re.compile(r"^(?:(?:[A-Za-z_][\w-]*|recipe)(?:\.[A-Za-z_][\w-]*|\[[^\]]*\])*(?:\.\.\.)?: \S"
                           r"|malformed JSON at line \d+ column \d+: |not UTF-8 text \(byte \d+\))")

Data = dict[str, Any]
NEST, HUGE_INT, DUP = "\x00nest\x00", "\x00hugeint\x00", "\x00dup\x00"  # placeholders replaced in the text
HUGE_STRING = "x" * 1_000_000
WEIRD = ["", HUGE_STRING, "\x1b[31mred\x1b[0m", "two\nlines", "tab\there", "\u2028", "\ud800", "é", "a'\"b"]
RETYPED = [None, True, False, 0, -1, 1, 2.5, -0.0, "", "x", "previous", [], {}, [1, 2], {"a": 1}, [[]]]
HUGE = [2**53, 2**53 + 1, -(2**53) - 1, 10**30, 1e308, 1e-308, 10**9, HUGE_INT]
NONFINITE = [float("nan"), float("inf"), float("-inf")]


# -- seeds: the shipped recipe and variants of it that reach the other runtime paths ----------------
def _schedule(d: Data, counts: list[int], n: int | None = None) -> None:
    n = d["schedule"]["visual_tokens"] if n is None else n
    d["schedule"].update(visual_tokens=n, counts=counts, fractions=[c / n if n > 0 else 0.0 for c in counts])


def _seeds() -> list[Data]:
    """The shipped recipe, and valid variants of it through every LLM rule, score layer, image policy
    and pre-LLM stage, with schedules that keep all, some or none of the tokens."""
    base = json.loads(SHIPPED.read_text())
    stages = [None, {"rule": "freepruner", "params": {"pivot_share": 0.5, "shallow_layer": None}, "encoder_layer": 0},
              {"rule": "ficoco-v", "params": {"merge": "additive"}, "encoder_layer": 1},
              {"rule": "freepruner", "params": {"shallow_layer": 0}, "encoder_layer": 1}]
    shapes = [[N, N, 72, 72, 72, 40, 40, 40], [N, 100, 50, 0, 0, 0, 0, 0], [0] * 8, [90, 90, 60, 60, 30, 30, 1, 1]]
    llm_rules = [name for name in sorted(RULES) if RULES[name].stage == "llm"]
    seeds = [base]
    for i, (rule, stage) in enumerate(itertools.product(llm_rules, stages)):
        d = copy.deepcopy(base)
        counts = shapes[(i + i // len(stages)) % len(shapes)]
        ranks = issubclass(RULES[rule], ScoringRule) and (stage is not None or counts[0] == N)
        d["selection"] = {"rule": rule, "params": {}, "score_layer": "previous" if ranks and i % 2 else "same",
                          "images": "pooled" if i % 3 == 0 else "per-image"}
        d["vision"] = copy.deepcopy(stage)
        _schedule(d, counts)
        seeds.append(d)
    return seeds


# -- mutation operators on the parsed recipe -----------------------------------------------------
def _slots(value: Any, out: list | None = None) -> list[tuple[Any, Any]]:
    """(container, key) of every value below the top level."""
    out = [] if out is None else out
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        out.append((value, key))
        _slots(item, out)
    return out


def _slot(rng: random.Random, d: Data, kinds: tuple[type, ...] = (object,)) -> tuple[Any, Any]:
    slots = [(c, k) for c, k in _slots(d) if isinstance(c[k], kinds)] or _slots(d)
    return rng.choice(slots)


def delete(rng: random.Random, d: Data) -> None:
    container, key = _slot(rng, d)
    del container[key]


def retype(rng: random.Random, d: Data) -> None:
    container, key = _slot(rng, d)
    container[key] = copy.deepcopy(rng.choice([v for v in RETYPED if type(v) is not type(container[key])]))


def nonfinite(rng: random.Random, d: Data) -> None:
    container, key = _slot(rng, d, (int, float))
    container[key] = rng.choice(NONFINITE)


def huge(rng: random.Random, d: Data) -> None:
    container, key = _slot(rng, d, (int, float, str))
    container[key] = rng.choice(HUGE + [HUGE_STRING])


def weird_string(rng: random.Random, d: Data) -> None:
    container, key = _slot(rng, d, (str,))
    container[key] = rng.choice(WEIRD)


def wrong_length(rng: random.Random, d: Data) -> None:
    lists = [(c, k) for c, k in _slots(d) if isinstance(c[k], list) and c[k]]
    container, key = rng.choice(lists) if rng.random() < 0.5 else (d["schedule"], rng.choice(["counts", "fractions"]))
    items = container[key]
    if rng.random() < 0.5:
        items.pop(rng.randrange(len(items)))
    else:
        items.insert(rng.randrange(len(items) + 1), copy.deepcopy(rng.choice(items)))


def increasing(rng: random.Random, d: Data) -> None:
    counts = d["schedule"]["counts"]
    i = rng.randrange(1, len(counts))
    counts[i] = min(counts[i - 1] + rng.randint(1, 5), d["schedule"]["visual_tokens"])
    if rng.random() < 0.8:
        _schedule(d, counts)


def nesting(rng: random.Random, d: Data) -> None:
    container, key = _slot(rng, d, (dict, list)) if rng.random() < 0.5 else (d["method"]["params"], "deep")
    container[key] = NEST + str(rng.choice([1, 5, 29, 31, 32, 33, 990, 1500, 100_000]))


def duplicate(rng: random.Random, d: Data) -> None:
    objects = [d] + [c[k] for c, k in _slots(d) if isinstance(c[k], dict) and c[k]]
    target = rng.choice(objects)
    copy_of = rng.choice(list(target))
    target[DUP + copy_of] = copy.deepcopy(rng.choice([target[copy_of], *RETYPED]))


def unknown_field(rng: random.Random, d: Data) -> None:
    objects = [d] + [c[k] for c, k in _slots(d) if isinstance(c[k], dict)]
    rng.choice(objects)[rng.choice(["extra", "Format", "\x1b[2Jwipe", "new\nline", "x" * 500])] = 1


def _rule_params(rng: random.Random, name: str) -> dict[str, Any]:
    """Parameters for rule `name`: mostly valid values, now and then one out of range or mistyped."""
    options: dict[str, tuple[list[Any], list[Any]]] = {  # name: (valid, invalid)
        "query": (["last", "text"], ["first", 1]), "heads": (["mean", "max"], ["median", None]),
        "seed": ([0, 7, 2**53], [1.5, "12", True, float("inf")]),
        "image_pivots": ([0, 1, 4, 200], [-1, 2.0]), "text_pivots": ([1, 4, 10**6], [-2, None]),
        "gamma": ([0, 0.6, 1], [1.5, "0.5"]), "beta": ([0.0, 0.6, 1.0], [2]), "quantile": ([0, 0.5, 0.998, 1], [1.01]),
        "merge": (["normalised", "additive"], ["sum"]), "lam": ([0, 0.35, 1], [-1]),
        "local_penalty": ([True, False], [1, "yes"]), "pivot_share": ([0, 0.5, 1], [1.2, None]),
        "shallow_layer": ([None, 0, 1], [-1, 10**6]),
    }
    names = [p for p in inspect.signature(RULES[name].__init__).parameters if p != "self"]
    params = {p: rng.choice(options.get(p, ([None], ["?"]))[0]) for p in names if rng.random() < 0.7}
    if params and rng.random() < 0.3:
        bad = rng.choice(list(params))
        params[bad] = rng.choice(options.get(bad, ([None], ["?"]))[1])
    if rng.random() < 0.05:
        params["bogus"] = 1
    return params


def semantic(rng: random.Random, d: Data) -> None:
    """A targeted change, often cross-field consistent, that gets past the type checks."""
    n, layers = d["schedule"]["visual_tokens"], len(d["schedule"]["counts"])
    edits: list[Callable[[], None]] = [
        lambda: d["selection"].update(rule=(r := rng.choice(sorted(RULES))), params=_rule_params(rng, r)),
        lambda: d["selection"].update(score_layer=rng.choice(["previous", "same"])),
        lambda: d["selection"].update(images=rng.choice(["pooled", "per-image", "all"])),
        lambda: d.update(vision={"rule": (r := rng.choice(sorted(RULES))), "params": _rule_params(rng, r),
                                 "encoder_layer": rng.choice([-1, 0, 1, 2, 5, 10**9])}),
        lambda: d.update(vision=None) if rng.random() < 0.5 else d.pop("vision", None),
        lambda: _schedule(d, sorted((rng.randint(0, n) for _ in range(layers)), reverse=True)),
        lambda: _schedule(d, [rng.choice([0, n])] * layers),
        lambda: _schedule(d, [min(c, rng.randint(0, n)) for c in d["schedule"]["counts"]]),
        lambda: _schedule(d, [c * 2 for c in d["schedule"]["counts"]], n * 2),
        lambda: _schedule(d, [c // 2 for c in d["schedule"]["counts"]], rng.choice([n // 2, 0, -n])),
        lambda: (d["model"].update(num_layers=layers + 1), _schedule(d, d["schedule"]["counts"] + [0])),
        lambda: d["model"].update({rng.choice(["num_layers", "hidden_size", "intermediate_size", "num_heads",
                                               "num_kv_heads", "head_dim", "visual_tokens_per_image"]):
                                   rng.choice([0, -1, 3, 1, 2**40, None])}),
        lambda: d["budget"].update(kind=rng.choice(["flops", "tokens", "none", "time"]),
                                   value=rng.choice([0, 0.25, 1, 1.0001, -0.5, 72.0, 1e9])),
        lambda: d["budget"].update(formula=rng.choice(["full", "visual", "other"])),
        lambda: d["budget"]["achieved"].update(full=rng.choice([-0.1, 0.0, 2.0])),
        lambda: d["calibration"].update(num_samples=rng.choice([0, -5, 1, 10**6])),
        lambda: d.update(format_version=rng.choice([1, 2, 2.0, 3, "2", True, None, -1])),
        lambda: d.update(format=rng.choice(["recipe-search/recipe ", "", None, 2])),
        lambda: d["model"].update(name_or_path=rng.choice(WEIRD), fingerprint=rng.choice(WEIRD)),
        lambda: d["model"].update(family=rng.choice(["qwen2_vl", "llava", *WEIRD])),
        lambda: d["calibration"].update(description=rng.choice(WEIRD)),
        lambda: d["method"]["params"].update(nested=NEST + str(rng.choice([3, 25, 31]))),
    ]
    rng.choice(edits)()


# -- mutation operators on the text or bytes -----------------------------------------------------
def _render(d: Data, rng: random.Random) -> str:
    text = json.dumps(d, indent=rng.choice([None, 2]))
    text = re.sub(r'"\\u0000nest\\u0000(\d+)"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)
    text = text.replace('"\\u0000hugeint\\u0000"', "9" * 5000)
    return text.replace('"\\u0000dup\\u0000', '"')


def truncated(rng: random.Random, text: str) -> bytes:
    return text[:rng.randrange(len(text))].encode()


def encoded(rng: random.Random, text: str) -> bytes:
    return rng.choice([lambda: b"\xef\xbb\xbf" + text.encode(), lambda: text.encode("utf-16"),
                       lambda: text.encode()[:-3] + b"\xff\xfe}", lambda: b"\x00" + text.encode(),
                       lambda: text.replace('"', "'", 1).encode()])()


# `semantic` leads three times as often: its edits are the ones that reach the cross-field checks.
STRUCTURAL = [delete, retype, nonfinite, huge, weird_string, wrong_length, increasing, nesting, duplicate,
              unknown_field, semantic, semantic, semantic]
TEXTUAL = [truncated, encoded]


def mutants(count: int) -> list[tuple[str, bytes]]:
    """`count` (operator names, file bytes): each operator leads in turn, others are mixed in at random."""
    seeds, out = _seeds(), []
    for i in range(count):
        rng = random.Random(SEED + i)
        d = copy.deepcopy(rng.choice(seeds))
        lead = (STRUCTURAL + TEXTUAL)[i % (len(STRUCTURAL) + len(TEXTUAL))]
        ops = [lead] + [rng.choice(STRUCTURAL) for _ in range(rng.choice([0, 0, 1, 2]))]
        for op in ops:
            if op in STRUCTURAL:
                try:
                    op(rng, d)
                except (LookupError, TypeError, ValueError, AttributeError):
                    pass  # an earlier operator removed or retyped what this one edits
        text = _render(d, rng)
        data = lead(rng, text) if lead in TEXTUAL else text.encode("utf-8", "surrogatepass")
        out.append(("+".join(op.__name__ for op in ops), data))
    return out


# -- the oracle ------------------------------------------------------------------------------------
def _one_line_naming_a_field(message: str, prefix: str) -> str | None:
    """None if `message` is a good refusal, else what is wrong with it."""
    if not all(c.isprintable() for c in message):
        return "unescaped control characters"
    if len(message) > 500:
        return f"{len(message)} characters"
    if not message.startswith(prefix) or not NAMES_A_FIELD.match(message[len(prefix):]):
        return "does not start with the field"
    return None


def classify(path: Path, model: torch.nn.Module, inputs: dict) -> tuple[str, str]:
    """(outcome, detail): outcomes starting with "BAD" are failures of the loader or the runtime; an
    accepted mutant's detail says which runtime path it took."""
    prefix = f"{path}: "
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        problem = _one_line_naming_a_field(str(exc), prefix)
        return ("BAD wrong error", f"{problem}: {str(exc)[:300]!r}") if problem else ("refused", str(exc)[len(prefix):])
    except BaseException as exc:  # noqa: BLE001 - counting wrong exception types is the point
        return "BAD wrong exception type", f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        handle = apply_recipe(model, recipe, allow_other_checkpoint=True)
    except RecipeError as exc:
        problem = _one_line_naming_a_field(str(exc), "")
        return ("BAD wrong error", f"apply: {problem}: {str(exc)[:300]!r}") if problem else ("refused by the model",
                                                                                          str(exc))
    except BaseException as exc:  # noqa: BLE001
        return "BAD accepted but does not apply", f"apply: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        with torch.no_grad(), handle:
            model(**inputs, use_cache=False)
        if handle.last_counts != recipe.schedule.counts:
            return "BAD accepted but does not apply", f"kept {handle.last_counts}, scheduled {recipe.schedule.counts}"
        again = save_recipe(recipe, path.with_name("saved.json"))
        if load_recipe(again) != recipe:
            return "BAD accepted but does not apply", "changes when saved and loaded again"
    except BaseException as exc:  # noqa: BLE001
        return "BAD accepted but does not apply", f"{type(exc).__name__}: {str(exc)[:200]}"
    sel, vision = recipe.selection, recipe.vision
    stage = "none" if vision is None else f"{vision.rule}@{vision.encoder_layer}"
    return "accepted", f"{sel.rule}/{sel.score_layer}/{sel.images}/vision {stage}"


def test_mutants_apply_cleanly_or_are_refused_naming_the_field(tmp_path, random_demo):
    model, processor, adapter = random_demo
    sample = demo_samples("eval", 1).samples[0]
    inputs = adapter.build_inputs(processor, [sample.image], [sample.prompt])
    started = time.perf_counter()
    outcomes: Counter[str] = Counter()
    by_operator: Counter[tuple[str, str]] = Counter()
    bad: list[str] = []
    paths: Counter[str] = Counter()
    path = tmp_path / "mutant.json"
    for name, data in mutants(N_MUTANTS):
        path.write_bytes(data)
        outcome, detail = classify(path, model, inputs)
        outcomes[outcome] += 1
        by_operator[(name.split("+")[0], outcome.split()[0])] += 1
        if outcome == "accepted":
            paths[detail] += 1
        if outcome.startswith("BAD"):
            bad.append(f"{name}: {outcome}: {detail}")
    seconds = time.perf_counter() - started
    wrong_type, wrong_message = outcomes["BAD wrong exception type"], outcomes["BAD wrong error"]
    invalid_accepted = outcomes["BAD accepted but does not apply"]
    print(f"\n{sum(outcomes.values())} mutants in {seconds:.1f} s: {dict(sorted(outcomes.items()))}")
    print("by leading operator:", dict(sorted(by_operator.items())))
    print("accepted, by rule/score layer/images/vision stage:", dict(paths.most_common()))
    print(f"wrong exception types: {wrong_type}; RecipeErrors not one line naming the field: {wrong_message}; "
          f"invalid but accepted: {invalid_accepted}")
    assert sum(outcomes.values()) >= 500
    assert outcomes["accepted"] >= 50 and outcomes["refused"] >= 250  # the fuzzer reaches both sides
    leads = Counter(lead for lead, _ in by_operator.elements())
    assert min(leads.values()) >= N_MUTANTS // 20 and len(leads) == len({*STRUCTURAL, *TEXTUAL})
    assert wrong_type == wrong_message == invalid_accepted == 0, "\n".join(bad[:20])
