"""The HTTP edge of the client: one keep-alive ``requests.Session`` per server, JSON in and out,
every non-2xx answer turned into a typed ``RemoteError``.

    api = ApiClient("http://127.0.0.1:8000", api_key="isk_...")
    info = api.get_json("/v1/models/smollm2-135m")           # raises AuthError, RemoteError(...)
    job = api.post_json("/v1/jobs", {"model": "smollm2-135m", "graph": graph.to_json()})

Every request has a timeout; a server that cannot be reached is a ``RemoteError("connection")``
that says so. Absolute URLs (presigned S3 downloads) are fetched without the API key.

Kept-alive connections idle for ``POOL_IDLE_S`` are dropped before the next request: the server's
gunicorn closes a connection idle 5 s, and a request sent on it just as it closes fails (a
researcher pausing between experiments would see a random "cannot reach"). A POST is not retried,
since the server may have taken it; a fresh connection avoids the race instead.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests

from ..errors import AuthError, RateLimitError, RemoteError, RemoteValidationError, remote_error

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
POOL_IDLE_S = 2.0         # under gunicorn's keepalive (the server sets 5 s: sandbox_server/gunicorn_app.py) and any usual proxy's
_CHUNK = 1 << 20


class ApiClient:
    """The server at ``host`` (``http(s)://name:port``), authorized with ``api_key``."""

    def __init__(self, host: str, api_key: str | None, read_timeout: float = READ_TIMEOUT) -> None:
        self.host = normalize_host(host)
        self.read_timeout = read_timeout
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = requests.Session()
        # requests re-reads the environment (proxies, CA bundle, .netrc) on every request, a third of a tiny
        # job's client time; read it once per server instead.
        self._session.trust_env = False
        self._session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._proxies: dict[str, dict[str, str]] = {}
        self._last_used = time.monotonic()

    def get_json(self, path: str, params: Mapping[str, Any] | None = None, *, auth: bool = True,
                 read_timeout: float | None = None) -> Any:
        return self._json(self._request("GET", path, params=params, auth=auth, read_timeout=read_timeout))

    def post_json(self, path: str, body: Any, params: Mapping[str, Any] | None = None,
                  read_timeout: float | None = None) -> Any:
        return self._json(self._request("POST", path, json=body, params=params, read_timeout=read_timeout))

    def delete_json(self, path: str) -> Any:
        return self._json(self._request("DELETE", path))

    def download(self, url: str, progress: Callable[[int, int | None], None] | None = None) -> bytes:
        """The bytes at ``url``: a server path (sent with the key) or an absolute URL (sent without it)."""
        absolute = url.startswith(("http://", "https://"))
        response = self._request("GET", url, auth=not absolute, stream=True)
        try:
            if progress is None:
                return bytes(response.raw.read(decode_content=True))   # one read, not 10 KB chunks
            total = response.headers.get("Content-Length")
            chunks = []
            for chunk in response.iter_content(_CHUNK):
                chunks.append(chunk)
                progress(len(chunk), int(total) if total and total.isdigit() else None)
            return b"".join(chunks)
        except requests.RequestException as err:
            raise RemoteError("connection", f"the download from {self._label(url)} broke off ({err}); "
                              "run the job's download again with job.wait()") from None
        finally:
            response.close()

    def close(self) -> None:
        self._session.close()

    # ----- internals -------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, auth: bool = True, read_timeout: float | None = None,
                 **kwargs: Any) -> requests.Response:
        url = path if path.startswith(("http://", "https://")) else self.host + path
        headers = self._auth if auth else {}
        timeout = (CONNECT_TIMEOUT, read_timeout if read_timeout is not None else self.read_timeout)
        if time.monotonic() - self._last_used > POOL_IDLE_S:
            self._session.close()          # closes the idle pooled connections; the session stays usable
        try:
            response = self._session.request(method, url, headers=headers, timeout=timeout,
                                             proxies=self._proxies_for(url), **kwargs)
        except requests.ConnectionError:
            raise RemoteError("connection", f"cannot reach {self._label(url)}: is the server running? Check the "
                              "host (argument host=... or env SANDBOX_HOST) and your network") from None
        except requests.Timeout:
            raise RemoteError("timeout", f"{self._label(url)} did not answer within {timeout[1]:.0f} s; "
                              "the server may be overloaded, try again later") from None
        except requests.RequestException as err:
            raise RemoteError("connection", f"request to {self._label(url)} failed: {err}") from None
        finally:
            self._last_used = time.monotonic()
        if response.status_code >= 400:
            error = error_from_response(response.status_code, _json_or_none(response), response.headers)
            response.close()
            raise error
        return response

    def _proxies_for(self, url: str) -> dict[str, str]:
        origin = "/".join(url.split("/", 3)[:3])
        proxies = self._proxies.get(origin)
        if proxies is None:
            proxies = self._proxies[origin] = dict(requests.utils.get_environ_proxies(origin))
        return proxies

    def _json(self, response: requests.Response) -> Any:
        body = _json_or_none(response)
        if body is None:
            raise RemoteError("bad_response", f"{self.host} answered HTTP {response.status_code} without JSON; "
                              "is host= the interp-sandbox server?", status=response.status_code)
        return body

    def _label(self, url: str) -> str:
        return url.split("?", 1)[0]   # a presigned URL's query is a credential: never print it


def normalize_host(host: str) -> str:
    """``http://Example.org:8000/`` -> ``http://example.org:8000``; a bare ``name:port`` gets ``http://``."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = "http://" + host
    scheme, _, rest = host.partition("://")
    if scheme.lower() not in ("http", "https") or not rest:
        raise RemoteError("config", f"host {host!r} is not an http(s) URL; give e.g. host='http://127.0.0.1:8000'")
    netloc, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{netloc.lower()}{slash}{path}"


def error_from_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> RemoteError:
    """The typed error for an HTTP error answer ``{"error": {"code", "message", "node", "source"}}``."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code") or f"http_{status}")
    message = str(error.get("message") or f"the server answered HTTP {status} without an error message")
    node = error.get("node") if isinstance(error.get("node"), int) else None
    source = str(error.get("source") or "")
    common: dict[str, Any] = {"status": status, "source": source, "node": node}
    if status in (401, 403):
        return AuthError(code, message + _AUTH_HINT.get(code, ""), **common)
    if status == 429:
        return RateLimitError(code, message, retry_after=_retry_after(headers), **common)
    if status in (400, 413):
        return remote_error(RemoteValidationError, code, message, **common)
    return RemoteError(code, message, **common)


_AUTH_HINT = {
    "unauthorized": " (pass api_key=... or set SANDBOX_API_KEY to a key from the server's admin)",
    "key_revoked": " (this key was revoked: ask the server's admin for a new one)",
}


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    value = (headers or {}).get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
