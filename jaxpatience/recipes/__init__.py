"""The recipes that chain the other parts: Iterative RPO (irpo.py) and the toy demo of both papers (demo.py)."""

from jaxpatience.recipes.demo import DemoConfig, load_demo_config, run_demo
from jaxpatience.recipes.irpo import load_irpo_config, run_irpo
