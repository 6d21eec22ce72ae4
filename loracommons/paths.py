"""Where the CLI keeps a user's files (identity, pinned keys)."""

from pathlib import Path

import platformdirs

APP = "loracommons"


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_identity() -> Path:
    return config_dir() / "identity" / "id_ecdsa"
