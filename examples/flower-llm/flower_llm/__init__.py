"""fedlora's LLM tier (``llm_scale``) as a Flower app: ``server_app.app`` and ``client_app.app``."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
