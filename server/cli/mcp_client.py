"""Connecting the real MCP client to a weightsmith service over streamable HTTP with a key."""

from __future__ import annotations

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def http_client(url: str, key: str, mode: str = "auto") -> Client:
    """`url` ends in /mcp. `mode`: "auto" (newest protocol, falling back), "legacy" (2025-11-25 handshake)."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30.0, read=300.0))
    return Client(streamable_http_client(url, http_client=http), mode=mode)  # type: ignore[arg-type]
