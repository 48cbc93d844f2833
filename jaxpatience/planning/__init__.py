"""`jaxpatience plan`, the sharding lab: a job compiled ahead of time per mesh for any target (lab.py, rows.py),
its optimised HLO read for FLOPs, traffic and collectives (hlo.py), accelerator figures and the roofline (chips.py,
roofline.py), and the tables and plots (report.py)."""

from jaxpatience.planning.chips import Chip, chip
from jaxpatience.planning.hlo import analyze
