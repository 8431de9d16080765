"""Ahead-of-time compiled backbones, cached on disk: compile once, load in milliseconds in every later run.

``torch.compile`` re-compiles in every process (20-80 s on a 2-core CPU, and Inductor's cache is bypassed
for frozen oneDNN weights), which a few hundred images never repay. AOTInductor writes the frozen, compiled
model to a ``.pt2`` package instead, keyed by everything it depends on (``featx.cache.model_key``). The package
holds a shared library that is loaded (run), so it is kept in featx's private cache (``featx.cache``).
"""

from __future__ import annotations

import torch
from torch import nn

from featx.cache import cached_file, model_key


def compiled_model(model: nn.Module, example: torch.Tensor, name: str = "model"):
    """``model`` frozen and compiled for inputs shaped like ``example``; compiled once, then loaded from the cache."""

    def build(path):
        for module in model.modules():  # in-place activations (SqueezeNet's ReLUs) cannot write frozen storage
            if getattr(module, "inplace", False):
                module.inplace = False
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            program = torch.export.export(model, (example,))
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))

    path = cached_file("compiled", f"{name}-{model_key(model, example)[:24]}.pt2", build,
                       f"{name} compiled for input {tuple(example.shape)}")
    return torch._inductor.aoti_load_package(str(path))
