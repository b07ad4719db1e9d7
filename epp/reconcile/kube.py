"""A thin async JSON client for the Kubernetes REST API (on kubernetes_asyncio's ApiClient).

The reconciler needs few verbs on arbitrary kinds: get, list, server-side apply, JSON /
merge patch, delete, watch, create Event. Using paths directly keeps every kind (built-in or
custom) on the same code path, without discovery round-trips.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.rest import ApiException

from epp.datalayer.kube_client import load_api_client

JSON = dict[str, Any]


@dataclass
class ApiError(Exception):
    status: int
    reason: str
    body: JSON

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.body.get('message', '')}"

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404


def _error(e: ApiException) -> ApiError:
    try:
        body = json.loads(e.body) if e.body else {}
    except (TypeError, ValueError):
        body = {"message": str(e.body)}
    return ApiError(int(e.status or 0), str(e.reason or ""), body if isinstance(body, dict) else {})


def path_for(api_version: str, plural: str, namespace: str = "", name: str = "",
             sub: str = "") -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    p = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


class Kube:
    """One API server connection. Create with `await Kube.connect(kubeconfig)`."""

    def __init__(self, api: kclient.ApiClient) -> None:
        self.api = api
        self._served: dict[str, bool] = {}

    @classmethod
    async def connect(cls, kubeconfig: str = "") -> Kube:
        return cls(await load_api_client(kubeconfig or None))

    async def close(self) -> None:
        await self.api.close()

    async def serves(self, api_version: str) -> bool:
        """Whether the server serves `group/version` (asked once per connection)."""
        if api_version not in self._served:
            path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            self._served[api_version] = await self.get_or_none(path) is not None
        return self._served[api_version]

    async def request(
        self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
        content_type: str = "application/json", timeout: float = 30.0,
    ) -> JSON:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            resp = await self.api.call_api(
                path, method, query_params=list((query or {}).items()), header_params=headers,
                body=body, auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=timeout,
            )
            raw = await resp.read()
            if resp.status >= 400:
                try:
                    err = json.loads(raw)
                except ValueError:
                    err = {"message": raw.decode(errors="replace")}
                raise ApiError(resp.status, str(resp.reason), err)
        except ApiException as e:
            raise _error(e) from None
        out = json.loads(raw) if raw else {}
        return out if isinstance(out, dict) else {}

    async def get(self, path: str) -> JSON:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> JSON | None:
        try:
            return await self.get(path)
        except ApiError as e:
            if e.not_found:
                return None
            raise

    async def list_objects(self, path: str, label_selector: str = "") -> JSON:
        return await self.request("GET", path, query={"labelSelector": label_selector}
                                  if label_selector else None)

    async def apply(self, path: str, obj: JSON, manager: str, force: bool = False) -> JSON:
        query = {"fieldManager": manager}
        if force:
            query["force"] = "true"
        return await self.request("PATCH", path, body=obj, query=query,
                                  content_type="application/apply-patch+yaml")

    async def json_patch(self, path: str, ops: list[JSON], manager: str = "") -> JSON:
        query = {"fieldManager": manager} if manager else None
        return await self.request("PATCH", path, body=ops, query=query,
                                  content_type="application/json-patch+json")

    async def merge_patch(self, path: str, patch: JSON, manager: str = "") -> JSON:
        query = {"fieldManager": manager} if manager else None
        return await self.request("PATCH", path, body=patch, query=query,
                                  content_type="application/merge-patch+json")

    async def delete(self, path: str) -> None:
        try:
            await self.request("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiError as e:
            if not e.not_found:
                raise

    async def create(self, path: str, obj: JSON) -> JSON:
        return await self.request("POST", path, body=obj)

    async def replace(self, path: str, obj: JSON) -> JSON:
        """PUT: an update guarded by the object's resourceVersion (409 if it moved on)."""
        return await self.request("PUT", path, body=obj)

    async def watch(self, path: str, resource_version: str, label_selector: str = "",
                    timeout_seconds: int = 300) -> AsyncIterator[JSON]:
        """Yield watch events ({type, object}) until the server closes the stream."""
        query = {"watch": "1", "resourceVersion": resource_version,
                 "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            query["labelSelector"] = label_selector
        try:
            resp = await self.api.call_api(
                path, "GET", query_params=list(query.items()),
                header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                _preload_content=False, _request_timeout=timeout_seconds + 30,
            )
        except ApiException as e:
            raise _error(e) from None
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, str(resp.reason), {})
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.release()
