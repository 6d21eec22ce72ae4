"""LoRA Commons: federated community fine-tuning of LoRA adapters."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loracommons")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
