"""jaxpatience: preference-training LLMs to reason (Patience, Iterative RPO) in JAX/Flax NNX.

The public surface: `load_pretrained`, `save_pretrained`, `generate` (with `SamplingConfig`), `ModelConfig`,
`Qwen2ForCausalLM`; the commands are `jaxpatience ...` or `python -m jaxpatience ...` (cli.py). Submodules are
imported lazily so that `import jaxpatience` does no work and does not start JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_pretrained": "jaxpatience.model.weights",
    "save_pretrained": "jaxpatience.model.weights",
    "generate": "jaxpatience.generation.api",
    "ModelConfig": "jaxpatience.config",
    "SamplingConfig": "jaxpatience.config",
    "Qwen2ForCausalLM": "jaxpatience.model.qwen2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxpatience' has no attribute {name!r}")
