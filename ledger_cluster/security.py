"""Who may call which gRPC port, and the credentials each side presents.

Two kinds of port:

- **Internal** (NodeService on every node): only the cluster's own processes may call it (the
  gateway, the nodes' transfer drivers, `ledger-dev`'s admin commands). Every call carries the
  cluster token (`authorization: Bearer <token>`), checked by a server interceptor that refuses
  anything else with UNAUTHENTICATED before a handler runs, so a refused call changes nothing.
  With internal TLS configured the port also speaks mutual TLS: the server presents its
  certificate and requires a client certificate signed by the cluster's CA. Without TLS the
  token travels in the clear, so a node refuses to serve NodeService on a non-loopback address
  without TLS.
- **Public** (LedgerService on the gateway and the standalone server): TLS when a certificate is
  given (a client CA makes it mutual), and bearer tokens when a token file is given. Without
  either it is open, which suits a loopback development setup only.

Health checks stay open on both kinds: they reveal only SERVING or NOT_SERVING, and load
balancers and process supervisors must reach them without secrets.

Secrets come from environment variables or files, never from command-line values (those show in
/proc/*/cmdline), and one shorter than SECRET_BYTES_MIN bytes is refused unless the caller
explicitly allows weak secrets (development only).
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc_health.v1 import health

from ledger_cluster.errors import ConfigError
from ledger_cluster.status import ApiError

# A guessable secret would let anybody who can reach a port speak as the cluster.
SECRET_BYTES_MIN = 32

CLUSTER_TOKEN_ENVIRONMENT_VARIABLE = "LEDGER_CLUSTER_TOKEN"
CLUSTER_TOKEN_FILE_ENVIRONMENT_VARIABLE = "LEDGER_CLUSTER_TOKEN_FILE"
# Paths (not secrets themselves) of the internal mutual-TLS identity: this process's
# certificate chain and key, and the cluster CA that signs every node's and gateway's.
INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE = "LEDGER_INTERNAL_TLS_CERT"
INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE = "LEDGER_INTERNAL_TLS_KEY"
INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE = "LEDGER_INTERNAL_TLS_CA"
# What a client of the public port presents: a bearer token, and the CA that signed the
# server's certificate (with a client certificate and key when the server asks for one).
CLIENT_TOKEN_ENVIRONMENT_VARIABLE = "LEDGER_CLIENT_TOKEN"
CLIENT_TLS_CA_ENVIRONMENT_VARIABLE = "LEDGER_TLS_CA"
CLIENT_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE = "LEDGER_TLS_CLIENT_CERT"
CLIENT_TLS_KEY_ENVIRONMENT_VARIABLE = "LEDGER_TLS_CLIENT_KEY"
# The public port's accepted client tokens: a file of one token per line, or the variable.
CLIENT_TOKENS_ENVIRONMENT_VARIABLE = "LEDGER_CLIENT_TOKENS"
# A token file of more lines than this is refused rather than read whole.
CLIENT_TOKENS_MAX = 1000

AUTHORIZATION_METADATA_KEY = "authorization"
BEARER_SCHEME = "bearer"  # compared without case, as HTTP authentication schemes are
BEARER_PREFIX = "Bearer "
# A token is sent as a header value: printable ASCII, no space.
TOKEN_CHARACTER_FIRST = "!"
TOKEN_CHARACTER_LAST = "~"
# Every development secret in the repository (.env) carries it; refused without the
# development flag, so a deployment that picks up .env fails loudly instead of running with a
# published secret.
DEVELOPMENT_SECRET_MARK = "local-development-only"
UNAUTHENTICATED_REASON = "UNAUTHENTICATED"
# Methods of these services are answered without credentials.
OPEN_SERVICES = frozenset({health.SERVICE_NAME})

Metadata = tuple[tuple[str, str], ...]
if TYPE_CHECKING:  # grpc's handler type is generic only in its stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


# -- secrets --------------------------------------------------------------------------------


def read_secret(
    what: str,
    *,
    environment_variable: str,
    path: str | None,
    allow_weak: bool,
    environment: Mapping[str, str] | None = None,
) -> str:
    """The secret `what` from the file at `path` (one trailing newline dropped) or else from
    `environment_variable`; ConfigError when missing, blank, unreadable, or shorter than
    SECRET_BYTES_MIN bytes without `allow_weak`."""
    environment = os.environ if environment is None else environment
    if path is not None:
        try:
            secret = Path(path).read_bytes().decode().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read the {what} from {path}: {error}") from error
        where = path
    elif environment.get(environment_variable) is not None:
        secret, where = environment[environment_variable], environment_variable
    else:
        raise ConfigError(f"no {what}: set {environment_variable} or give its file")
    check_secret(what, secret, where, allow_weak)
    return secret


def check_secret(what: str, secret: str, where: str, allow_weak: bool) -> None:
    if not secret.strip():
        raise ConfigError(f"the {what} in {where} is empty")
    size = len(secret.encode())
    if size < SECRET_BYTES_MIN and not allow_weak:
        raise ConfigError(
            f"the {what} in {where} is {size} bytes; at least {SECRET_BYTES_MIN} are needed"
            " (weak secrets are accepted for development only, with --allow-weak-secrets)"
        )
    if DEVELOPMENT_SECRET_MARK in secret and not allow_weak:
        raise ConfigError(
            f"the {what} in {where} is the repository's published development secret; draw your"
            " own (e.g. `openssl rand -base64 32`), or pass --allow-weak-secrets for development"
        )


def check_token_characters(what: str, token: str) -> None:
    if not all(TOKEN_CHARACTER_FIRST <= character <= TOKEN_CHARACTER_LAST for character in token):
        raise ConfigError(f"the {what} may hold only printable ASCII without spaces (it travels in a header)")


def read_client_tokens(path: str | None, allow_weak: bool) -> tuple[str, ...]:
    """The public port's accepted bearer tokens: one per line of `path` (blank lines and lines
    starting with # skipped), else comma-separated in CLIENT_TOKENS_ENVIRONMENT_VARIABLE; ()
    when neither is set (the port takes calls without a token)."""
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read client tokens from {path}: {error}") from error
        where = path
    elif CLIENT_TOKENS_ENVIRONMENT_VARIABLE in os.environ:
        # Set but blank is a mistake, never "no tokens": the port would take every call.
        lines = os.environ[CLIENT_TOKENS_ENVIRONMENT_VARIABLE].split(",")
        where = CLIENT_TOKENS_ENVIRONMENT_VARIABLE
    else:
        return ()
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ConfigError(f"{where} holds no client token")
    if len(tokens) > CLIENT_TOKENS_MAX:
        raise ConfigError(f"{where} holds {len(tokens)} client tokens; at most {CLIENT_TOKENS_MAX}")
    for number, token in enumerate(tokens, start=1):
        check_secret(f"client token #{number}", token, where, allow_weak)
        check_token_characters(f"client token #{number} in {where}", token)
    return tokens


# -- TLS material ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate chain and its private key (PEM), and the CA (PEM) that the other side's
    certificate must chain to, when one is checked."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    root_certificates: bytes | None


def _read_pem(what: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} from {path}: {error}") from error


def tls_identity(
    certificate_path: str | None, key_path: str | None, ca_path: str | None
) -> TlsIdentity | None:
    """The identity in these files, None when no certificate and key are given; ConfigError
    when only one of the pair is."""
    if certificate_path is None and key_path is None:
        if ca_path is not None:
            raise ConfigError("a TLS CA was given without a certificate and key to serve with")
        return None
    if certificate_path is None or key_path is None:
        raise ConfigError("TLS needs both a certificate and its private key")
    return TlsIdentity(
        certificate_chain=_read_pem("TLS certificate", certificate_path),
        private_key=_read_pem("TLS private key", key_path),
        root_certificates=_read_pem("TLS CA", ca_path) if ca_path is not None else None,
    )


def is_loopback_address(address: str) -> bool:
    """Whether a host:port (host a name or an IP) can only be reached from this machine."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the server side ------------------------------------------------------------------------


def bearer_metadata(token: str | None) -> Metadata:
    return ((AUTHORIZATION_METADATA_KEY, BEARER_PREFIX + token),) if token is not None else ()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED and before the handler runs, every call outside
    OPEN_SERVICES whose `authorization` metadata is not `Bearer <one of tokens>`."""

    def __init__(self, tokens: Iterable[str], who: str) -> None:
        self._accepted = tuple(token.encode() for token in tokens)
        if not self._accepted:
            raise ValueError("an interceptor needs at least one token")
        self._who = who

    def admits(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == AUTHORIZATION_METADATA_KEY:
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                scheme, _, presented = text.partition(" ")
                if scheme.lower() != BEARER_SCHEME:
                    return False
                # Every candidate is compared, in constant time each, so timing shows nothing.
                candidate = presented.strip().encode()
                matches = [hmac.compare_digest(candidate, accepted) for accepted in self._accepted]
                return any(matches)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        metadata = handler_call_details.invocation_metadata
        # No handler: grpc answers UNIMPLEMENTED, which tells nothing a token would protect.
        if handler is None or service in OPEN_SERVICES or self.admits(metadata):
            return handler
        return _refusing(handler, f"{handler_call_details.method} needs {self._who}")


def _refusing(handler: Handler, message: str) -> Handler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""
    failure = ApiError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_REASON, message)

    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(failure.to_grpc_status())

    shapes = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    build = shapes[(bool(handler.request_streaming), bool(handler.response_streaming))]
    # No request deserializer: a refused request is never parsed (it may be 16 MiB).
    return build(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


@dataclass(frozen=True)
class ServerCredentials:
    """How one port is served: TLS or not (mutual when the identity carries a client CA), and
    the bearer tokens it accepts (none: no token is asked for)."""

    tls: TlsIdentity | None
    tokens: tuple[str, ...] = field(repr=False)
    who: str

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [BearerTokenInterceptor(self.tokens, self.who)] if self.tokens else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address`; OSError when it cannot."""
        try:
            if self.tls is None:
                return int(server.add_insecure_port(address))
            credentials = grpc.ssl_server_credentials(
                [(self.tls.private_key, self.tls.certificate_chain)],
                root_certificates=self.tls.root_certificates,
                require_client_auth=self.tls.root_certificates is not None,
            )
            return int(server.add_secure_port(address, credentials))
        except RuntimeError as error:  # grpcio raises rather than return 0 when it cannot bind
            raise OSError(f"cannot listen on {address}: {error}") from error


# -- the client side ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """What a client presents to one kind of port: a bearer token (or none) and TLS roots
    (with its own certificate for mutual TLS), or plaintext when `tls` is None."""

    token: str | None = field(repr=False)
    tls: TlsIdentity | None
    # Whether asyncio channels add the token themselves (False: the caller passes `metadata`).
    intercept: bool = True

    @property
    def metadata(self) -> Metadata:
        return bearer_metadata(self.token)

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        assert self.tls is not None
        # An identity of roots only: a client certificate is optional.
        if not self.tls.certificate_chain:
            return grpc.ssl_channel_credentials(root_certificates=self.tls.root_certificates)
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls.root_certificates,
            private_key=self.tls.private_key,
            certificate_chain=self.tls.certificate_chain,
        )

    def _check_exposure(self, address: str) -> None:
        """ConfigError rather than send a token in the clear beyond this machine."""
        if self.token is not None and self.tls is None and not is_loopback_address(address):
            raise ConfigError(
                f"{address} is not a loopback address: a token is sent there only over TLS"
                f" (set {INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE} and the rest for the cluster's own"
                f" calls, {CLIENT_TLS_CA_ENVIRONMENT_VARIABLE} for a gateway)"
            )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel whose every call carries the token."""
        self._check_exposure(address)
        if self.tls is None:
            channel = grpc.insecure_channel(address, options=list(options))
        else:
            channel = grpc.secure_channel(address, self._channel_credentials(), options=list(options))
        if self.token is None:
            return channel
        return grpc.intercept_channel(channel, _MetadataInterceptor(self.metadata))

    def aio_channel(
        self,
        address: str,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        """An asyncio channel whose calls carry the token through an interceptor, unless made
        `without_interceptors` (hot paths pass `metadata` per call: an asyncio interceptor
        costs a task per call); `interceptors` run after that one (tracing, counting)."""
        self._check_exposure(address)
        interceptors = [*self.aio_interceptors(), *interceptors]
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
        return grpc.aio.secure_channel(
            address, self._channel_credentials(), options=list(options), interceptors=interceptors
        )

    def aio_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_AioMetadataInterceptor(self.metadata)] if self.token is not None and self.intercept else []

    def without_interceptors(self) -> ClientCredentials:
        """The same credentials for asyncio channels whose callers pass `metadata` themselves."""
        return dataclasses.replace(self, intercept=False)


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def _with_metadata(self, details: Any) -> Any:
        return _CallDetails(
            details.method,
            details.timeout,
            tuple(details.metadata or ()) + self._metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_metadata(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_metadata(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_metadata(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_metadata(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Metadata = field(repr=False)  # it carries the token
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _AioMetadataInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
):
    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def _with_metadata(self, details: Any) -> Any:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*(tuple(details.metadata or ()) + self._metadata)),
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_metadata(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_metadata(details), request)


# -- the cluster's credentials from the environment -------------------------------------------


def internal_tls_from_environment(environment: Mapping[str, str] | None = None) -> TlsIdentity | None:
    environment = os.environ if environment is None else environment
    identity = tls_identity(
        environment.get(INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE),
        environment.get(INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE),
        environment.get(INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE),
    )
    if identity is not None and identity.root_certificates is None:
        raise ConfigError(
            f"internal TLS is mutual: set {INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE} to the cluster CA"
        )
    return identity


@dataclass(frozen=True)
class InternalCredentials:
    """The cluster token and internal TLS identity, for both ends of NodeService."""

    token: str = field(repr=False)
    tls: TlsIdentity | None

    @classmethod
    def from_environment(
        cls,
        token_path: str | None = None,
        allow_weak: bool = False,
        environment: Mapping[str, str] | None = None,
    ) -> InternalCredentials:
        environment = os.environ if environment is None else environment
        token = read_secret(
            "cluster token",
            environment_variable=CLUSTER_TOKEN_ENVIRONMENT_VARIABLE,
            path=token_path or environment.get(CLUSTER_TOKEN_FILE_ENVIRONMENT_VARIABLE),
            allow_weak=allow_weak,
            environment=environment,
        )
        check_token_characters("cluster token", token)
        return cls(token=token, tls=internal_tls_from_environment(environment))

    def server(self) -> ServerCredentials:
        return ServerCredentials(tls=self.tls, tokens=(self.token,), who="the cluster token")

    def client(self) -> ClientCredentials:
        return ClientCredentials(token=self.token, tls=self.tls)

    def check_listen_address(self, address: str) -> None:
        """Refuse to serve NodeService in plaintext beyond this machine: the token would cross
        the network readable."""
        if self.tls is None and not is_loopback_address(address):
            raise ConfigError(
                f"NodeService on {address} is reachable from other machines: set"
                f" {INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE}, {INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE}"
                f" and {INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE} (mutual TLS between the cluster's processes)"
            )


def public_client_from_environment(environment: Mapping[str, str] | None = None) -> ClientCredentials:
    """What a tool presents to a gateway or standalone server, from LEDGER_CLIENT_TOKEN and
    LEDGER_TLS_CA (plus LEDGER_TLS_CLIENT_CERT/KEY for a server that asks for a certificate)."""
    environment = os.environ if environment is None else environment
    ca_path = environment.get(CLIENT_TLS_CA_ENVIRONMENT_VARIABLE)
    certificate_path = environment.get(CLIENT_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE)
    key_path = environment.get(CLIENT_TLS_KEY_ENVIRONMENT_VARIABLE)
    token = environment.get(CLIENT_TOKEN_ENVIRONMENT_VARIABLE) or None
    if ca_path is None:
        if certificate_path is not None or key_path is not None:
            raise ConfigError(f"a client certificate needs {CLIENT_TLS_CA_ENVIRONMENT_VARIABLE} too")
        return ClientCredentials(token=token, tls=None)
    roots = _read_pem("TLS CA", ca_path)
    if certificate_path is None and key_path is None:
        return ClientCredentials(token=token, tls=TlsIdentity(b"", b"", roots))
    identity = tls_identity(certificate_path, key_path, ca_path)
    return ClientCredentials(token=token, tls=identity)
