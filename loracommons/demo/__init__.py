"""The demo's embedded assets: a tiny pretrained base model and generated skill data.

`base_model_path()` is the shipped Hugging Face folder, built by
``python -m loracommons.demo.build_base``; `loracommons.demo.skills` generates data.
"""

from pathlib import Path


def base_model_path() -> Path:
    """Folder of the embedded base model (loads with `AutoModelForCausalLM.from_pretrained`)."""
    return Path(__file__).resolve().parent / "base"
