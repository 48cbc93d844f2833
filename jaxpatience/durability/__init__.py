"""What long jobs write and how it survives a kill: the durable JSONL store (store.py), training metrics
(metrics.py) and the trackers they may also go to (trackers.py: TensorBoard, W&B), the fault-injection hook of
the reliability tests (faults.py), the fingerprints a rerun compares (identity.py), which command a folder or
file belongs to (outputs.py) and progress bars (progress.py). No JAX here: the data loader and the teacher use
it too."""

from jaxpatience.durability.identity import check_same_inputs, model_fingerprint, model_inputs
from jaxpatience.durability.metrics import MetricsWriter, read_metrics
from jaxpatience.durability.outputs import Output, claim_file, claim_folder
from jaxpatience.durability.store import DiskFull, JsonlStore, StoreError, read_jsonl, write_jsonl
