"""The command line's side of the API: a channel (unix socket, TCP, TLS, client
certificates), whole lists gathered over pages, and replies as plain dicts for printing.

Exit codes for scripts live here too, so every command means the same by them."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _q
from pathlib import Path

import grpc

from agent.api.generated import agent_pb2, agent_pb2_grpc

EXIT_OK = 0
EXIT_UNAVAILABLE = 1     # no agent answering, not synced, a stream that broke
EXIT_USAGE = 2           # bad flags, or the agent refused the request (INVALID_ARGUMENT)
EXIT_NOT_FOUND = 3       # a filter was given and nothing matched it
# entries asked for per page: a page is built in one go by the agent, and each call has
# its deadline (all_pages); 5000 (the server's largest) missed 10 s on a loaded machine at
# 50k services, and 1000 costs 100 round trips of ~1 ms for 100k service ports
PAGE = 1000
# a page of 1000 service ports of a few hundred backends each is more than gRPC's default
# receive limit (4 MiB), which would refuse it
MAX_MESSAGE = 1 << 30
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE)]


@dataclass(frozen=True)
class ClientTls:
    ca: Path | None = None          # the CA that signed the agent's certificate
    cert: Path | None = None        # ours, when the agent asks for client certificates
    key: Path | None = None
    server_name: str = ""           # check the agent's certificate for this name instead

    @property
    def enabled(self) -> bool:
        return self.ca is not None


def channel(address: str, tls: ClientTls = ClientTls()) -> grpc.Channel:
    if not tls.enabled:
        return grpc.insecure_channel(address, options=_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(address, credentials, options=_OPTIONS + options)


def stub(ch: grpc.Channel) -> agent_pb2_grpc.AgentStub:
    return agent_pb2_grpc.AgentStub(ch)


def exit_code(error: grpc.RpcError) -> int:
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EXIT_USAGE
    if code == grpc.StatusCode.NOT_FOUND:
        return EXIT_NOT_FOUND
    return EXIT_UNAVAILABLE


def describe(error: grpc.RpcError, address: str) -> str:
    code = error.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return f"the agent refused the request: {error.details()}"
    return f"no agent answering at {address}: {code.name} ({error.details()})"


def service_filter(namespace: str = "", name: str = "", address: str = ""
                   ) -> agent_pb2.ServiceFilter:
    return agent_pb2.ServiceFilter(namespace=namespace or "", name=name or "",
                                   address=address or "")


def all_pages(call, request_type, field: str, flt: agent_pb2.ServiceFilter,
              timeout: float = 10.0) -> Iterator:
    """Every entry of a paged list RPC, page after page."""
    token = ""
    while True:
        reply = call(request_type(filter=flt, page_size=PAGE, page_token=token),
                     timeout=timeout)
        yield from getattr(reply, field)
        token = reply.next_page_token
        if not token:
            return


def to_plain(message) -> dict:
    """A message as plain dicts, lists and numbers with proto field names, defaults
    included (json_format's options for that differ between protobuf versions)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(sorted(value.items()))
        elif _repeated(field):
            out[field.name] = [to_plain(v) if field.message_type else v for v in value]
        elif field.message_type is not None:
            out[field.name] = to_plain(value)
        else:
            out[field.name] = value
    return out


def _repeated(field) -> bool:
    # protobuf 7 dropped FieldDescriptor.label for is_repeated
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def service_entry(s: agent_pb2.ServicePort) -> dict:
    """DESIGN.md's `services -o json` entry, exactly (scripts rely on its keys); plus
    held_back, only on a port the kernel keeps that no listed object claims."""
    entry = {
        "namespace": s.namespace, "name": s.name, "port_name": s.port_name,
        "protocol": s.protocol,
        # "allocated" only on an address or port the manifest source allocated
        "frontends": [{"address": f.address, "port": f.port, "kind": f.kind,
                       **({"allocated": True} if f.allocated else {})}
                      for f in s.frontends],
        "backends": [{"address": b.address, "port": b.port, "state": b.state}
                     for b in s.backends],
    }
    if s.held_back:
        entry["held_back"] = s.held_back
    return entry


# `services -o json` without a dict per entry: json.dumps(indent=2) of service_entry() runs
# json's pure-Python encoder (its C one takes no indent), ~10 s for 100k service ports; these
# templates give the same text, character for character (tests/unit/test_api_output.py)
_FRONTEND = '      {\n        "address": %s,\n        "port": %d,\n        "kind": %s%s\n      }'
_ALLOCATED = ',\n        "allocated": true'
_BACKEND = '      {\n        "address": %s,\n        "port": %d,\n        "state": %s\n      }'
_ENTRY = ('  {\n    "namespace": %s,\n    "name": %s,\n    "port_name": %s,\n'
          '    "protocol": %s,\n    "frontends": %s,\n    "backends": %s%s\n  }')


def _json_list(items: list[str]) -> str:
    return "[\n" + ",\n".join(items) + "\n    ]" if items else "[]"


def services_json(ports: Iterable[agent_pb2.ServicePort]) -> Iterator[str]:
    """json.dumps([service_entry(p) for p in ports], indent=2), in pieces."""
    first = True
    for s in ports:
        frontends = [_FRONTEND % (_q(f.address), f.port, _q(f.kind),
                                  _ALLOCATED if f.allocated else "") for f in s.frontends]
        backends = [_BACKEND % (_q(b.address), b.port, _q(b.state)) for b in s.backends]
        yield ("[\n" if first else ",\n") + _ENTRY % (
            _q(s.namespace), _q(s.name), _q(s.port_name), _q(s.protocol),
            _json_list(frontends), _json_list(backends),
            ',\n    "held_back": ' + _q(s.held_back) if s.held_back else "")
        first = False
    yield "[]" if first else "\n]"
