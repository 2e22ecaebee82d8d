"""The CLI's REST client: talks to WEIGHTSMITH_URL with WEIGHTSMITH_API_KEY, and says in one line what
went wrong (no traceback) when the service cannot be reached or refuses the call."""

from __future__ import annotations

import os
from typing import Any

import httpx

from server.settings import Settings


class ClientError(Exception):
    """One line for the person at the terminal; `exit_code` 2 for set-up problems, 1 for refusals."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def base_url() -> str:
    settings = Settings()
    return os.environ.get("WEIGHTSMITH_URL", f"http://{settings.host}:{settings.port}")


def call(method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
         timeout: float = 70.0) -> Any:
    key = os.environ.get("WEIGHTSMITH_API_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = base_url()
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            response = client.request(method, path, params=params, json=body)
    except httpx.TransportError as err:
        raise ClientError(f"cannot reach the service at {url} ({type(err).__name__}); start it with "
                          "'weightsmith serve', or set WEIGHTSMITH_URL", exit_code=2) from err
    if response.status_code == 401:
        how = ("WEIGHTSMITH_API_KEY is not set" if not key else "the service does not accept WEIGHTSMITH_API_KEY "
               "(unknown or revoked)")
        raise ClientError(f"{how}: create a key with 'weightsmith agents add NAME' and export "
                          "WEIGHTSMITH_API_KEY=ws_...", exit_code=2)
    if response.headers.get("content-type", "").startswith("text/html"):
        return response.text
    payload = response.json()
    if response.status_code >= 400:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            raise ClientError(f"error {response.status_code}: {payload}")
        where = f" (param: {error['param']})" if error.get("param") else ""
        raise ClientError(f"{error.get('code', 'error')}: {error.get('message')}{where}")
    return payload
