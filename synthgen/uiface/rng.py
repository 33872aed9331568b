"""Seeded draws that work whatever device the torch.Generator lives on."""

from __future__ import annotations

from collections.abc import Callable

import torch


def draw(
    fn: Callable[..., torch.Tensor], *args, generator: torch.Generator | None, device, **kwargs
) -> torch.Tensor:
    """Call ``torch.rand``/``randn``/``randint`` on ``generator``'s device and move the result to ``device``."""
    source = generator.device if generator is not None else device
    return fn(*args, generator=generator, device=source, **kwargs).to(device)
