"""jaxpatience: preference-training LLMs to reason (Patience, Iterative RPO) in JAX/Flax NNX.

The public surface (DESIGN.md): `load_pretrained`, `save_pretrained`, `generate`. Submodules are imported
lazily so that `import jaxpatience` does no work and does not start JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_pretrained": "jaxpatience.weights",
    "save_pretrained": "jaxpatience.weights",
    "generate": "jaxpatience.decode",
    "ModelConfig": "jaxpatience.config",
    "Qwen2ForCausalLM": "jaxpatience.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxpatience' has no attribute {name!r}")
