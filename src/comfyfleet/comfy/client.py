"""A client for one ComfyUI server's HTTP and websocket protocol (comfyui-protocol.md).

Tolerant by design: unknown keys are ignored, and nothing assumes a message arrives.
Its requests go over the lean HTTP client (http_client.py), pooled per backend; its websocket
over the lean websocket client (websocket.py); the multipart upload of an input over one
aiohttp session per backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

import aiohttp

from comfyfleet import json_codec
from comfyfleet.comfy import websocket
from comfyfleet.comfy.websocket import WebSocket
from comfyfleet.http_client import HttpClient, HttpError, Response, Timeouts

# ComfyUI's garbage-collection stalls can hold a response for ~0.5 s; never time out tightly.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)
TIMEOUTS = Timeouts(connect=5, total=30)
# No total limit for an output: a large video may take long; a stalled read still fails.
VIEW_TIMEOUTS = Timeouts(connect=5, read=60)
# To connect and have the websocket's handshake answered.
WEBSOCKET_TIMEOUT = 30.0
JSON_HEADERS = {"Content-Type": "application/json"}


class ComfyError(Exception):
    """The backend could not be reached or answered something unexpected."""


@dataclass
class PromptRejected(ComfyError):
    """POST /prompt answered 400: the prompt itself is invalid (retrying elsewhere won't help)."""

    status: int
    body: dict[str, Any]

    def __str__(self) -> str:
        error = self.body.get("error")
        if isinstance(error, dict):
            return f"{error.get('type')}: {error.get('message')}"
        return f"prompt rejected with HTTP {self.status}"


class OutputMissing(ComfyError):
    """GET /view answered 404: the file is not there (deleted, a wiped temp directory); asking
    again will not bring it back."""


class ComfyClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, http: HttpClient) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._http = http

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def _get_json(self, path: str) -> Any:
        return await self._request("GET", path)

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON a GET answers (None for a POST); anything but a 200 is a ComfyError."""
        data, headers = (b"", None) if body is None else (json_codec.dumps(body), JSON_HEADERS)
        try:
            async with self._http.request(
                method, self._url(path), body=data, headers=headers, timeouts=TIMEOUTS
            ) as response:
                if response.status != 200:
                    raise ComfyError(f"{method} {path}: HTTP {response.status}")
                return await response.json() if method == "GET" else await response.read()
        except (HttpError, ValueError) as exc:
            raise ComfyError(f"{method} {path}: {exc!r}") from exc

    async def queue_prompt(
        self, prompt: dict[str, Any], *, prompt_id: str, client_id: str,
        extra_data: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`extra_data`: what ComfyUI passes to the nodes with the prompt (a partner-node
        key); it adds `client_id` there itself. Never sent twice: a connection that breaks
        after the request was written is a ComfyError, whatever the backend made of it."""
        body: dict[str, Any] = {"prompt": prompt, "prompt_id": prompt_id, "client_id": client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            async with self._http.request(
                "POST", self._url("/prompt"), body=json_codec.dumps(body),
                headers=JSON_HEADERS, timeouts=TIMEOUTS,
            ) as response:
                payload = await response.json()
                if response.status == 400 and isinstance(payload, dict):
                    raise PromptRejected(response.status, payload)
                if response.status != 200 or not isinstance(payload, dict):
                    raise ComfyError(f"POST /prompt: HTTP {response.status}")
                return payload
        except (HttpError, ValueError) as exc:
            raise ComfyError(f"POST /prompt: {exc!r}") from exc

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry, or None while it is unknown (queued, running or lost)."""
        entries = await self._get_json(f"/history/{prompt_id}")
        entry = entries.get(prompt_id) if isinstance(entries, dict) else None
        return entry if isinstance(entry, dict) else None

    async def queued_prompt_ids(self) -> set[str]:
        """The ids of the prompts running or pending there (`GET /queue`)."""
        queue = await self._get_json("/queue")
        ids: set[str] = set()
        for key in ("queue_running", "queue_pending"):
            items = queue.get(key) if isinstance(queue, dict) else None
            for item in items or []:
                if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str):
                    ids.add(item[1])
        return ids

    async def system_stats(self) -> dict[str, Any]:
        result = await self._get_json("/system_stats")
        return result if isinstance(result, dict) else {}

    async def object_info(self) -> dict[str, Any]:
        result = await self._get_json("/object_info")
        return result if isinstance(result, dict) else {}

    async def upload_image(
        self, data: bytes, name: str, subfolder: str, content_type: str
    ) -> None:
        """Put an input file into the backend's input folder under exactly `name`."""
        form = aiohttp.FormData(quote_fields=False)  # ComfyUI keeps names as sent
        form.add_field("image", data, filename=name, content_type=content_type)
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true")
        try:
            async with self.session.post(
                self._url("/upload/image"), data=form, timeout=DEFAULT_TIMEOUT
            ) as response:
                stored = await response.json(content_type=None) if response.status == 200 \
                    else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ComfyError(f"POST /upload/image: {exc!r}") from exc
        if not isinstance(stored, dict) or stored.get("name") != name:
            raise ComfyError(f"POST /upload/image {name}: answered {stored!r}")

    async def interrupt(self, prompt_id: str) -> None:
        await self._post("/interrupt", {"prompt_id": prompt_id})

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        await self._post("/queue", {"delete": prompt_ids})

    async def cleanup_version(self) -> str | None:
        """The version of the comfyfleet-cleanup package (comfyui_nodes/) on this backend;
        None when it is not installed (404)."""
        try:
            async with self._http.request(
                "GET", self._url("/comfyfleet/ping"), timeouts=TIMEOUTS
            ) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise ComfyError(f"GET /comfyfleet/ping: HTTP {response.status}")
                answer = await response.json()
        except (HttpError, ValueError) as exc:
            raise ComfyError(f"GET /comfyfleet/ping: {exc!r}") from exc
        version = answer.get("version") if isinstance(answer, dict) else None
        # A str version means `answer` is a dict.
        if not isinstance(version, str) or answer.get("package") != "comfyfleet-cleanup":
            raise ComfyError(f"GET /comfyfleet/ping: not comfyfleet-cleanup: {answer!r:.200}")
        return version

    async def delete_file(
        self, filename: str, subfolder: str, folder_type: str, token: str
    ) -> bool:
        """Delete a file on the backend through comfyfleet-cleanup: True when it was deleted,
        False when it was not there (any other refusal is a ComfyError)."""
        body = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        headers = {**JSON_HEADERS, "Authorization": f"Bearer {token}"}
        try:
            async with self._http.request(
                "POST", self._url("/comfyfleet/delete"), body=json_codec.dumps(body),
                headers=headers, timeouts=TIMEOUTS,
            ) as response:
                if response.status in (200, 404):
                    await response.read()
                    return response.status == 200
                # The package says why (a wrong token, a path outside, ...); read a bounded part.
                reason = (await response.read(300)).decode(errors="replace")
                raise ComfyError(f"deleting {subfolder}/{filename}: HTTP {response.status} "
                                 f"{reason}")
        except HttpError as exc:
            raise ComfyError(f"deleting {subfolder}/{filename}: {exc!r}") from exc

    def view(self, filename: str, subfolder: str, folder_type: str, chunk_bytes: int) -> View:
        """The body of the output as `/view` answers it, in chunks of `chunk_bytes`, streamed
        (never held whole), to be read inside the block (`async with client.view(...) as
        chunks`); anything but 200 is an error, never an empty file. A body that breaks off
        is a ComfyError, the backend's failure: whoever streams it on (a storage) must not
        take it for a failure of its own."""
        # As urlencode writes it, without its generality (half of its CPU).
        query = (f"filename={quote_plus(filename)}&subfolder={quote_plus(subfolder)}"
                 f"&type={quote_plus(folder_type)}")
        return View(self._http.request("GET", self._url(f"/view?{query}"),
                                       timeouts=VIEW_TIMEOUTS),
                    f"GET /view {subfolder}/{filename}", chunk_bytes)

    async def connect_websocket(self, client_id: str) -> WebSocket:
        try:
            async with asyncio.timeout(WEBSOCKET_TIMEOUT):
                return await websocket.connect(
                    self._url("/ws?" + urlencode({"clientId": client_id})))
        except TimeoutError as exc:
            raise ComfyError(f"websocket: no handshake in {WEBSOCKET_TIMEOUT:g} s") from exc
        except websocket.WebSocketError as exc:
            raise ComfyError(f"websocket: {exc}") from exc


class View:
    """`ComfyClient.view`'s block and the chunks of its body: a class, not an
    @asynccontextmanager yielding an async generator over Response.chunks' (each async
    generator costs the event loop's hooks, a weak set's add and remove in Python, and one
    left unfinished is closed by a task of its own)."""

    def __init__(self, request: AbstractAsyncContextManager[Response], what: str,
                 chunk_bytes: int) -> None:
        self._request = request
        self._what = what
        self._chunk_bytes = chunk_bytes
        self._chunks: AsyncIterator[bytes] | None = None

    async def __aenter__(self) -> View:
        try:
            response = await self._request.__aenter__()
        except HttpError as exc:
            raise ComfyError(f"{self._what}: {exc!r}") from exc
        if response.status != 200:
            await self._request.__aexit__(None, None, None)  # (its body unread: closed)
            if response.status == 404:
                raise OutputMissing(f"{self._what}: HTTP 404")
            raise ComfyError(f"{self._what}: HTTP {response.status}")
        self._chunks = response.chunks(self._chunk_bytes)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._request.__aexit__(*exc_info)

    def __aiter__(self) -> View:
        return self

    async def __anext__(self) -> bytes:
        assert self._chunks is not None  # (entered)
        try:
            return await self._chunks.__anext__()
        except HttpError as exc:
            raise ComfyError(f"{self._what}: the body broke off: {exc!r}") from exc
