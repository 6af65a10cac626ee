import os
import sys
from pathlib import Path

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers: tiny.py, distributed.py, cli.py
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # config_reference.py, the docs generator
