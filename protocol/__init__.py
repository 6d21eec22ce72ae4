"""The trust core of LoRA Commons: identities, signed updates, signed releases.

Everything that crosses a trust boundary is parsed and verified here. This
package imports neither torch nor flwr, so a downloader can install it alone.
"""

from loracommons.protocol.codec import TensorSpec, decode_tensors, encode_tensors
from loracommons.protocol.envelope import (
    Envelope,
    Expected,
    UpdateManifest,
    open_envelope,
    sign_update,
    verify_update,
)
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import PublicKey, SigningKey, fingerprint_display
from loracommons.protocol.release import (
    ReleaseManifest,
    SignedRelease,
    sign_release,
    verify_chain,
    verify_release,
)

__all__ = [
    "Envelope",
    "Expected",
    "ProtocolError",
    "PublicKey",
    "ReleaseManifest",
    "SignedRelease",
    "SigningKey",
    "TensorSpec",
    "UpdateManifest",
    "decode_tensors",
    "encode_tensors",
    "fingerprint_display",
    "open_envelope",
    "sign_release",
    "sign_update",
    "verify_chain",
    "verify_release",
    "verify_update",
]
