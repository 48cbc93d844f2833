"""Generation: `generate` (api.py) over the slot engine (slots.py, the default) or static batches (static.py);
the plan and shape buckets they share (shapes.py); sampling and per-row keys (sampling.py)."""

from jaxpatience.generation.api import Request, generate
from jaxpatience.generation.sampling import Generation, Sampler
from jaxpatience.generation.scheduler import EngineStats
