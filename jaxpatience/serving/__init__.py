"""`jaxpatience serve`: the OpenAI wire format with no JAX and no web framework (wire.py), the slot engine kept
running for a server (live.py), and the FastAPI app over both (app.py)."""

from jaxpatience.serving.app import build_app
from jaxpatience.serving.live import Job, LiveEngine
from jaxpatience.serving.wire import ApiError
