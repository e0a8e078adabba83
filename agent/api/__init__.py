"""The gRPC status API and its generated stubs.

Reads the applied state; never writes it."""
