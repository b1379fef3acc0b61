"""lmms-eval model `recipe_search`: any supported checkpoint with a pruning recipe applied.

    lmms-eval --model recipe_search \\
        --model_args pretrained=PATH_OR_demo,recipe=RECIPE.json[,allow_other_checkpoint=true] \\
        --tasks gqa,mme,pope,textvqa_val --batch_size 1

lmms-eval >= 0.7 finds the model through the `lmms_eval.models` entry point
(`recipe_search = "recipe_search.integrations.lmms_eval:manifest"`, installed by the
`lmms-eval` extra). This is the only module of recipe_search that imports lmms_eval.

Model arguments (`--model_args k=v,...`):
  pretrained              a local checkpoint folder, a hub id already in the local cache, or `demo`
  recipe                  a recipe JSON; omitted or empty = the unpruned model (the baseline)
  allow_other_checkpoint  use the recipe on another checkpoint of the same architecture
  dtype                   float32 (default), bfloat16, float16
  attn_implementation     sdpa (default) or eager
  threads                 torch CPU threads (the demo defaults to 1, as `search-recipe eval`)
  device                  also `--device`; cpu by default

The chat class (the default) receives lmms-eval's messages, the simple class (`--force_simple`)
the task's text and visuals; both build inputs with the family adapter (the processor's own chat
template, one user turn, images first) and generate with the model's `generate()`. The simple
class also scores `loglikelihood` / `multiple_choice` tasks.
"""
from __future__ import annotations

import json
from typing import Any

from lmms_eval.api import instance as _instance
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from .runner import PrunedModel, as_bool, clean_context, images_of, split_messages

MODEL_ID = "recipe_search"


def manifest() -> ModelManifest:
    """The entry point lmms-eval reads (group `lmms_eval.models`)."""
    return ModelManifest(
        model_id=MODEL_ID,
        chat_class_path=f"{__name__}.RecipeSearchChat",
        simple_class_path=f"{__name__}.RecipeSearchSimple",
        aliases=("recipe-search",),
    )


def _loglikelihood_output(loss: float, greedy: bool) -> Any:
    """A (loss, is_greedy) pair as the evaluator keeps it. lmms-eval 0.7.3 passes every model
    output through `unwrap_generation_output`, which turns a tuple into its string (and then
    `multiple_choice` scoring fails); a `GenerationResult` is passed through untouched."""
    pair = (float(loss), bool(greedy))
    unwrap = getattr(_instance, "unwrap_generation_output", None)
    if unwrap is not None and not isinstance(unwrap(pair)[0], tuple) and hasattr(_instance, "GenerationResult"):
        return _instance.GenerationResult(text=pair)  # type: ignore[arg-type]
    return pair


_GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "until")


class _RecipeSearchBase(lmms):
    """Shared construction and batched generation."""

    def __init__(self, pretrained: str = "demo", recipe: str | None = None, allow_other_checkpoint: Any = False,
                 dtype: str | None = None, attn_implementation: str = "sdpa", threads: int | None = None,
                 device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            known = "pretrained, recipe, allow_other_checkpoint, dtype, attn_implementation, threads, device"
            raise ValueError(f"recipe_search model: unknown model_args {', '.join(sorted(unknown))} (known: {known})")
        if str(batch_size).startswith("auto"):
            raise ValueError("recipe_search model: --batch_size auto is not supported; give a number")
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.runner = PrunedModel(
            str(pretrained), None if recipe in (None, "") else str(recipe),
            allow_other_checkpoint=as_bool(allow_other_checkpoint, "allow_other_checkpoint"),
            device=device, dtype=dtype, attn_implementation=str(attn_implementation),
            threads=None if threads in (None, "") else int(threads),
        )

    # lmms-eval reads these
    @property
    def model(self):
        return self.runner.model

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.runner.device

    def _generate_all(self, items: list[tuple[list, str, dict]]) -> list[str]:
        """Generate for (images, prompt, gen_kwargs) items in their order, in batches of requests
        that share generation settings."""
        results: list[str | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (_, _, kwargs) in enumerate(items):
            key = json.dumps({k: kwargs.get(k) for k in _GEN_KEYS}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="recipe_search responding")
        for indices in groups.values():
            kwargs = items[indices[0]][2]
            until = kwargs.get("until")
            if isinstance(until, str):
                until = [until]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self.runner.generate(
                    [items[i][0] for i in chunk], [items[i][1] for i in chunk],
                    max_new_tokens=int(kwargs.get("max_new_tokens") or 128), until=until,
                    temperature=float(kwargs.get("temperature") or 0.0), top_p=kwargs.get("top_p"),
                    num_beams=int(kwargs.get("num_beams") or 1), do_sample=kwargs.get("do_sample"),
                )
                for i, text in zip(chunk, texts):
                    results[i] = text
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("recipe_search model: multi-round generation is not supported")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("recipe_search model: loglikelihood tasks need the simple class "
                                  "(run lmms-eval with --force_simple)")


class RecipeSearchChat(_RecipeSearchBase):
    """Chat interface: requests carry `doc_to_messages`."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[str]:
        items = []
        for request in requests:
            _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            messages = doc_to_messages(self.task_dict[task][split][doc_id])
            images, text = split_messages(messages)
            items.append((images, text, dict(gen_kwargs or {})))
        return self._generate_all(items)


class RecipeSearchSimple(_RecipeSearchBase):
    """Simple interface (`--force_simple`): requests carry the text and `doc_to_visual`."""

    is_simple = True

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        return images_of(doc_to_visual(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        items = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            items.append((self._visuals(doc_to_visual, doc_id, task, split), clean_context(context),
                          dict(gen_kwargs or {})))
        return self._generate_all(items)

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """Per request (loss, is_greedy), with loss the mean negative log-likelihood per continuation
        token, lmms-eval's convention (its HF models return the loss; `multiple_choice` picks the
        least)."""
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="recipe_search scoring"):
            if len(request.args) != 6:
                raise NotImplementedError("recipe_search model: unconditional loglikelihood (acc_mutual_info) "
                                          "is not supported")
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else str(target(doc))
            ll = self.runner.loglikelihood(self._visuals(doc_to_visual, doc_id, task, split),
                                           clean_context(context), continuation)
            out.append(_loglikelihood_output(ll.loss, ll.greedy))
        return out
