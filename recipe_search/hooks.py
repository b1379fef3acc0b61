"""One hook abstraction for every place recipe-search watches or steers a model.

The shape is accelerate's `ModelHook`: an object with `pre_forward` (may rewrite the call) and
`post_forward` (may rewrite the output), attached to modules through a `HookSet` that removes
them all at once. The runtime, the vision stage, calibration and the schedule scorer all use it,
so "leaving the model exactly as it was" is proved once, here.
"""
from __future__ import annotations

from typing import Any

from torch import nn


class ModelHook:
    """Override either method; returning None leaves the call or the output unchanged."""

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return None


class HookSet:
    """Hooks attached as a set and removed as a set (also on leaving a `with` block)."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, module: nn.Module, hook: ModelHook) -> ModelHook:
        """Attach `hook` to `module`; only the methods the hook overrides are registered."""
        cls = type(hook)
        if cls.pre_forward is not ModelHook.pre_forward:
            self._handles.append(module.register_forward_pre_hook(hook.pre_forward, with_kwargs=True))
        if cls.post_forward is not ModelHook.post_forward:
            self._handles.append(module.register_forward_hook(hook.post_forward, with_kwargs=True))
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class CallHook(ModelHook):
    """A pre-forward hook from a plain function `fn(module, args, kwargs)` (for one-off observers)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return self.fn(module, args, kwargs)
