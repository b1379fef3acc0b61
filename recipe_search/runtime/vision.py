"""The pre-LLM stage: select (or merge) visual tokens inside the vision tower, before the projector.

A vision-side rule runs once per image in a pre-hook on one encoder layer (`encoder_layer`, by
default the last layer whose output the LLM reads), on that layer's input: the CLS token (when
the tower has one) is always kept, the surviving patches stay in their original spatial order,
and the remaining encoder layers and the projector run on the shorter sequence. The projector's
output is scattered back to the image's full placeholder span; the decoder's layer-0 pre-hook
(applier.py) then drops the placeholders of the discarded patches, so survivors keep their
original positions exactly as with LLM-side pruning. The rule sees only the image, so a cached
`generate()` and a re-forward choose alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..hooks import CallHook, HookSet, ModelHook
from ..models.base import ModelAdapter, VisionLayout
from .selection import Choice, SelectionRule, check_fraction, register


@dataclass
class VisionContext:
    """What a vision-side rule may look at: the stage layer's input and earlier layers' inputs."""

    adapter: ModelAdapter
    layout: VisionLayout
    layer_idx: int
    hidden: torch.Tensor                                   # (B, tokens, dv) input of the stage layer
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # earlier layers' inputs by index

    @property
    def offset(self) -> int:
        """Index of the first patch (1 after a CLS token)."""
        return int(self.layout.has_cls)

    def _head_logits(self, layer_idx: int | None) -> torch.Tensor:
        """Scaled pre-softmax logits (B, H, tokens, tokens) of encoder layer `layer_idx` (default: stage)."""
        idx = self.layer_idx if layer_idx is None else layer_idx
        hidden = self.hidden if idx == self.layer_idx else self.inputs[idx]
        q, k, scale = self.adapter.vision_query_key(self.adapter.vision_layers()[idx], hidden)
        return (q.float() @ k.float().transpose(-1, -2)) * scale

    def logits(self, layer_idx: int | None = None) -> torch.Tensor:
        """Head-mean pre-softmax logits (B, tokens, tokens) of encoder layer `layer_idx` (default: stage)."""
        return self._head_logits(layer_idx).mean(dim=1)

    def received(self, layer_idx: int | None = None) -> torch.Tensor:
        """(B, patches) head-mean softmax attention each patch receives, summed over all queries."""
        probs = torch.softmax(self._head_logits(layer_idx), dim=-1).mean(dim=1)
        return probs.sum(dim=1)[:, self.offset:]


class VisionRule(SelectionRule):
    """A rule for the pre-LLM stage: `select(ctx, k)` keeps k patches of every image."""

    stage = "vision"

    def needs_layers(self, stage_layer: int) -> tuple[int, ...]:
        """Earlier encoder layers whose inputs the rule reads (recorded by pre-hooks)."""
        return ()


@register
class FreePrunerRule(VisionRule):
    """freePruner-style (our design, methods.md section 4; not a reproduction of the paper).

    Pivotal tokens: the share `pivot_share` of the budget with the highest contribution degree,
    the attention a patch receives (head mean, summed over all queries) at the stage layer.
    Complementary tokens: the rest of the budget, the non-pivots receiving most attention at the
    shallower `shallow_layer` (default: half the stage layer's depth), for low-level detail.
    """

    name = "freepruner"

    def __init__(self, pivot_share: float = 0.5, shallow_layer: int | None = None) -> None:
        self.pivot_share = check_fraction(self.name, "pivot_share", pivot_share)
        if shallow_layer is not None and (isinstance(shallow_layer, bool) or not isinstance(shallow_layer, int)
                                          or shallow_layer < 0):
            raise ValueError(f"freepruner rule: shallow_layer must be a non-negative integer, not {shallow_layer!r}")
        self.shallow_layer = shallow_layer

    def params(self) -> dict[str, Any]:
        return {"pivot_share": self.pivot_share, "shallow_layer": self.shallow_layer}

    def _shallow(self, stage_layer: int) -> int:
        layer = stage_layer // 2 if self.shallow_layer is None else self.shallow_layer
        if layer > stage_layer:
            raise ValueError(f"freepruner rule: shallow_layer {layer} is deeper than the stage layer {stage_layer}")
        return layer

    def needs_layers(self, stage_layer: int) -> tuple[int, ...]:
        layer = self._shallow(stage_layer)
        return () if layer == stage_layer else (layer,)

    def select(self, ctx: VisionContext, k: int) -> Choice:
        pivots = round(self.pivot_share * k)
        contribution = ctx.received()
        chosen = contribution.topk(pivots, dim=1).indices
        detail = ctx.received(self._shallow(ctx.layer_idx)).scatter(1, chosen, float("-inf"))
        rest = detail.topk(k - pivots, dim=1).indices
        return Choice(torch.cat([chosen, rest], dim=1).sort(dim=1).values)


class VisionStage:
    """Hooks of one pre-LLM stage; `take()` hands the decoder the patches kept for the last images."""

    def __init__(self, adapter: ModelAdapter, rule: SelectionRule, layer: int | None,
                 keep_for: Callable[[int], int], hooks: HookSet) -> None:
        if rule.stage != "vision":
            raise ValueError(f"selection rule {rule.name!r} runs in the LLM, not in the vision tower")
        assert isinstance(rule, VisionRule)
        self.adapter, self.rule, self.keep_for = adapter, rule, keep_for
        self.layout = adapter.vision_layout()
        self.layer = resolve_encoder_layer(self.layout, layer)
        self._inputs: dict[int, torch.Tensor] = {}
        self._kept: torch.Tensor | None = None
        layers = adapter.vision_layers()
        for i in rule.needs_layers(self.layer):
            hooks.add(layers[i], CallHook(self._record(i)))
        hooks.add(layers[self.layer], CallHook(self._select))
        hooks.add(adapter.projector(), _Scatter(self))

    def forget(self) -> None:
        """Images are about to be encoded again: drop what the last encoding left."""
        self._kept = None
        self._inputs.clear()

    def take(self) -> torch.Tensor | None:
        """(B_images, k) kept patch indices of the last encoded images, consumed once."""
        kept, self._kept = self._kept, None
        return kept

    def _record(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs[idx] = self.adapter.vision_hidden(args, kwargs)

        return hook

    def _select(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = self.adapter.vision_hidden(args, kwargs)
        k = self.keep_for(self.layout.patches)
        if k >= self.layout.patches:
            self._kept = None
            return None
        if k == 0:  # a tower cannot run on no token: keep its sequence, the decoder drops every patch
            self._kept = torch.zeros(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
            return None
        ctx = VisionContext(self.adapter, self.layout, self.layer, hidden, dict(self._inputs))
        choice = self.rule.select(ctx, k)
        self._inputs.clear()
        off = ctx.offset
        patches = hidden[:, off:]
        if choice.merge is not None:
            kept = (choice.merge @ patches.float()).to(hidden.dtype)
        else:
            kept = patches.gather(1, choice.keep[..., None].expand(-1, -1, hidden.shape[-1]))
        hidden = torch.cat([hidden[:, :off], kept], dim=1)
        self._kept = choice.keep
        return self.adapter.with_hidden(args, kwargs, hidden)


class _Scatter(ModelHook):
    """Put the projected survivors back at their patch slots (the rest are dropped at layer 0)."""

    def __init__(self, stage: VisionStage) -> None:
        self.stage = stage

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        kept = self.stage._kept
        if kept is None or output.shape[1] != kept.shape[1]:
            return None
        full = output.new_zeros(output.shape[0], self.stage.layout.patches, output.shape[-1])
        return full.scatter(1, kept[..., None].expand(-1, -1, output.shape[-1]), output)


def resolve_encoder_layer(layout: VisionLayout, layer: int | None) -> int:
    """The encoder layer whose input the stage reduces: by default the last one the LLM's features pass."""
    last = layout.feature_index - 1
    if last < 0:
        raise ValueError("the LLM reads the vision embeddings directly: no encoder layer to select in")
    chosen = last if layer is None else layer
    if not 0 <= chosen <= last:
        raise ValueError(f"vision encoder_layer must be in [0, {last}] (the LLM reads the output of layer {last}), "
                         f"not {chosen}")
    return chosen
