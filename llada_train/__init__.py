"""llada_train: train and post-train LLaDA2.x block-diffusion language models.

Paths of the repository's own folders (configs, shipped data) are resolved here once, so entry
points work from any working directory of an editable install.
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(REPO_ROOT, "conf")
DATA_DIR = os.path.join(REPO_ROOT, "data")
RECIPES_DIR = os.path.join(REPO_ROOT, "recipes")
DEFAULT_TOKENIZER_DIR = os.path.join(DATA_DIR, "tokenizer")

__version__ = "0.1.0"
