"""Rollout backends behind one interface (`base.Sampler`) and the `build_sampler` factory.

Backends register a loader with `@register_backend(name)`; loaders import their module lazily, so
choosing "hf" never imports vLLM (which may not even be installed).
"""
from __future__ import annotations

from typing import Callable

from rlengine.rollout.base import Generation, Sampler, SamplingParams

_BACKENDS: dict[str, Callable[[], type]] = {}


def register_backend(name: str):
    """Decorator: `fn() -> Sampler subclass` becomes the loader of backend `name`."""
    def decorate(loader: Callable[[], type]) -> Callable[[], type]:
        _BACKENDS[name] = loader
        return loader
    return decorate


@register_backend("hf")
def _hf_backend() -> type:
    from rlengine.rollout.hf_sampler import HFSampler

    return HFSampler


@register_backend("vllm")
def _vllm_backend() -> type:
    from rlengine.rollout.vllm_sampler import VLLMSampler

    return VLLMSampler


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def build_sampler(backend: str, model_path: str, **kwargs) -> Sampler:
    """The sampler of `backend` ("hf", "vllm") for `model_path`; keyword arguments go to its
    constructor (e.g. dtype, device, batch_size)."""
    if backend not in _BACKENDS:
        raise ValueError(f"rollout backend {backend!r} is unknown; choose one of {available_backends()}")
    return _BACKENDS[backend]()(model_path, **kwargs)


__all__ = ["Generation", "Sampler", "SamplingParams", "build_sampler", "register_backend", "available_backends"]
