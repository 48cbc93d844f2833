"""Training: the DPO / DPO+NLL / SFT step on a mesh (two strategies), the batches it takes, and the run around it.

trainer = create_trainer(model, train_config, mesh)   # step.py
metrics = trainer.step(host_batch)                    # batch.place_batch -> the jitted step (gspmd / shard_map)
"""

from jaxpatience.training.batch import (
    BATCH_KEYS,
    PACKED_KEYS,
    Batch,
    batch_sharding,
    device_batch,
    packed_row_multiple,
    place_batch,
    split_micro_batches,
    validate_batch,
)
from jaxpatience.training.core import (
    REMAT_POLICIES,
    TrainState,
    accumulate_gradients,
    apply_remat,
    apply_update,
    batch_denominators,
    jit_step,
    model_loss,
    pair_logps,
    resolve_attention,
    step_keys,
    step_model,
)
from jaxpatience.training.loop import load_run_config, train
from jaxpatience.training.optimizer import make_optimizer, make_schedule
from jaxpatience.training.step import (
    Trainer,
    create_trainer,
    lower_abstract_step,
    make_logps_fn,
    make_mesh,
    make_train_step,
    prepare_model,
    split_model,
    tree_shardings,
)
