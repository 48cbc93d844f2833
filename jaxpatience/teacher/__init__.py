"""`jaxpatience pairs`, Patience's data: a teacher model writes a concise and a patient solution to each problem.
Its settings (config.py), prompts (prompts.py), the retrying OpenAI client (client.py), the resumable run (run.py).
No JAX here."""

from jaxpatience.teacher.config import TeacherConfig, TeacherError
from jaxpatience.teacher.prompts import load_prompts
from jaxpatience.teacher.run import build_pairs
