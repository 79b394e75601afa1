"""CurveZMQ transport encryption of a kernel's Jupyter channels, as
jupyter_client 8.10 negotiates it and ipykernel 7.4 serves it.

The KernelManager owns the keys: with ``transport_encryption`` ``"auto"`` (and
a kernelspec declaring ``metadata.supported_encryption: ["curve"]``) or
``"required"``, it makes one Curve key pair per kernel and writes it into the
connection info as ``curve_publickey`` / ``curve_secretkey`` (Z85 text). The
kernel binds each of its five sockets as a Curve *server* with that pair; a
client sets ``curve_serverkey`` to the public key (jupyter_client's
``_create_connected_socket`` does). A client that does not know the server's
public key cannot complete the handshake, so it can neither send a request
nor receive iopub; every byte on the wire is encrypted. (The server does not
authenticate clients by key: HMAC signing still says who may send requests.)

:class:`CurveKeys` is the pair, checked; :func:`serve_on` makes a socket a
Curve server; :func:`manager_keys` is the provisioner's side of the
negotiation (what jupyter_client's ``LocalProvisioner.pre_launch`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import Pyrepl3Error

if TYPE_CHECKING:
    import zmq

# zmq is imported where it is used: the standalone kernel imports this module
# before its worker starts, and zmq is not needed for that.

PUBLIC = "curve_publickey"
SECRET = "curve_secretkey"
#: Length of a Z85-encoded Curve key.
Z85_KEY_LENGTH = 40


class CurveKeyError(Pyrepl3Error, ValueError):
    """Curve keys in a connection info that cannot be used."""


@dataclass(frozen=True)
class CurveKeys:
    """A kernel's Curve key pair, Z85-encoded (40 ASCII characters each)."""

    public: bytes
    secret: bytes

    @classmethod
    def of(cls, info: dict[str, Any]) -> CurveKeys | None:
        """The pair in a connection info, or None if it has none (the
        kernel then runs without encryption). Raises :class:`CurveKeyError`
        for half a pair, a malformed key, a public key that is not the
        secret key's, or a libzmq built without Curve."""
        public, secret = info.get(PUBLIC), info.get(SECRET)
        if public is None and secret is None:
            return None
        if public is None or secret is None:
            missing = PUBLIC if public is None else SECRET
            raise CurveKeyError(
                f"the connection info has only half a Curve key pair: {missing} is missing"
            )
        keys = cls(_key_bytes(PUBLIC, public), _key_bytes(SECRET, secret))
        import zmq

        if not zmq.has("curve"):
            raise CurveKeyError(
                "the connection info asks for CurveZMQ encryption, but this pyzmq's libzmq "
                "has no Curve support (zmq.has('curve') is False); install a pyzmq built "
                "with libsodium, or start the kernel with transport_encryption='disabled'"
            )
        try:
            derived = zmq.curve_public(keys.secret)
        except zmq.ZMQError:
            raise CurveKeyError(f"{SECRET} is not a Curve secret key") from None
        if derived != keys.public:
            raise CurveKeyError(f"{PUBLIC} is not the public key of {SECRET}")
        return keys

    def as_info(self) -> dict[str, str]:
        """The pair as connection info fields (text, as in a connection file)."""
        return {PUBLIC: self.public.decode("ascii"), SECRET: self.secret.decode("ascii")}


def serve_on(sock: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    """Make ``sock`` a Curve server with ``keys`` (before it is bound); with
    None, leave it plain."""
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True


def manager_keys(km: Any) -> CurveKeys | None:
    """The keys a kernel launched by ``km`` (a jupyter_client KernelManager)
    must serve with, made on ``km`` when its policy asks for them and it has
    none yet, as ``LocalProvisioner.pre_launch`` does: ``"required"``, or
    ``"auto"`` with a kernelspec that declares Curve. Keys ``km`` already
    holds (a restart, a loaded connection file) are kept, whatever the
    policy. Raises RuntimeError where ``"required"`` cannot be met."""
    import zmq

    policy_of = getattr(km, "_transport_encryption_policy", None)
    policy = policy_of() if callable(policy_of) else "disabled"
    if policy == "required" and getattr(km, "transport", "tcp") not in ("tcp", "ipc"):
        raise RuntimeError(
            "transport_encryption='required' is only supported when transport is 'tcp' or 'ipc'."
        )
    if getattr(km, "curve_publickey", None) is None:
        supported = getattr(km, "_kernel_supports_curve_encryption", lambda: False)
        if policy == "required" or (policy == "auto" and supported()):
            km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
    public, secret = getattr(km, "curve_publickey", None), getattr(km, "curve_secretkey", None)
    if public is None or secret is None:
        return None
    return CurveKeys.of({PUBLIC: public, SECRET: secret})


def _key_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            raise CurveKeyError(f"{name} must be a Z85 key (ASCII text)") from None
    if not isinstance(value, bytes) or len(value) != Z85_KEY_LENGTH:
        raise CurveKeyError(
            f"{name} must be a Z85-encoded Curve key of {Z85_KEY_LENGTH} characters "
            f"(got {_shape(value)})"
        )
    from zmq.utils import z85

    try:
        z85.decode(value)
    except (ValueError, KeyError):
        raise CurveKeyError(f"{name} is not valid Z85 text") from None
    return value


def _shape(value: Any) -> str:
    """What a bad key is, without its content (it may be a secret)."""
    if isinstance(value, bytes):
        return f"{len(value)} characters"
    return type(value).__name__
