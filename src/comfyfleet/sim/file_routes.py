"""GET /view, POST /upload/image and POST /upload/mask, as in ComfyUI's server.py."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator
from typing import BinaryIO

from aiohttp import BodyPartReader, web

from comfyfleet.sim.faults import Faults
from comfyfleet.sim.files import (
    Folders,
    ViewTarget,
    needs_rendering,
    render_view,
    resolve_view,
    store_upload,
    write_masked,
)

# How often a throttled /view writes: small enough pieces to look like a steady trickle.
_THROTTLE_WRITES_PER_SECOND = 20
_MAX_CHUNK = 256 * 1024


def server_error() -> web.Response:
    # The exact response aiohttp gives when a handler raises, which is how ComfyUI answers
    # a body it cannot parse.
    text = "500 Internal Server Error\n\nServer got itself in trouble"
    return web.Response(status=500, text=text)


class FileRoutes:
    def __init__(self, *, folders: Folders, faults: Faults, max_upload_size: int) -> None:
        self.folders = folders
        self.faults = faults
        self.max_upload_size = max_upload_size

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/view", self.view),
            web.post("/upload/image", self.upload_image),
            web.post("/upload/mask", self.upload_mask),
        ]

    async def view(self, request: web.Request) -> web.StreamResponse:
        if self.faults.view_status is not None:
            return web.Response(status=self.faults.view_status, text="view unavailable")
        target = await asyncio.to_thread(resolve_view, self.folders, request.query)
        if not isinstance(target, ViewTarget):
            return web.Response(status=target)
        disposition = {"Content-Disposition": f'filename="{target.filename}"'}
        preview = request.query.get("preview")
        channel = request.query.get("channel", "")  # "" and "rgba" both mean "as is"
        rate, cut = self.faults.view_bytes_per_second, self.faults.view_cut_bytes
        plain = rate is None and cut is None
        if needs_rendering(preview, channel):
            body, content_type = await asyncio.to_thread(render_view, target.path, preview, channel)
            if plain:
                return web.Response(body=body, content_type=content_type, headers=disposition)
            headers = {**disposition, "Content-Type": content_type}
            return await _faulty(request, headers, len(body), _pieces(body), rate, cut)
        headers = {**disposition, "Content-Type": target.content_type}
        if plain:
            return web.FileResponse(target.path, headers=headers)
        size = await asyncio.to_thread(os.path.getsize, target.path)
        return await _faulty(request, headers, size, _file_pieces(target.path), rate, cut)

    async def upload_image(self, request: web.Request) -> web.Response:
        return await self._upload(request, masked=False)

    async def upload_mask(self, request: web.Request) -> web.Response:
        return await self._upload(request, masked=True)

    async def _upload(self, request: web.Request, *, masked: bool) -> web.Response:
        fields, upload = await self._read_form(request)
        dir_type = fields.get("type", "input")
        directory = self.folders.by_type(dir_type)
        if directory is None:
            return server_error()  # ComfyUI crashes on an unknown type
        if upload is None or not upload[0]:
            return web.Response(status=400)
        filename, data = upload
        subfolder = fields.get("subfolder", "")
        overwrite = fields.get("overwrite") in ("true", "1")
        write = None
        if masked:
            write = functools.partial(write_masked, self.folders, fields.get("original_ref"), data)
        try:
            name = await asyncio.to_thread(
                store_upload, directory, filename, subfolder, data, overwrite, write
            )
        except Exception:
            return server_error()  # what ComfyUI answers when the mask cannot be applied
        if name is None:
            return web.Response(status=400)
        return web.json_response({"name": name, "subfolder": subfolder, "type": dir_type})

    async def _read_form(
        self, request: web.Request
    ) -> tuple[dict[str, str], tuple[str, bytes] | None]:
        """Multipart text fields and the `image` file part (first occurrences), in memory.

        The size limit is enforced here because the multipart reader, unlike request.post(),
        does not apply client_max_size; going over it answers 413 as ComfyUI's post() does.
        """
        fields: dict[str, str] = {}
        upload: tuple[str, bytes] | None = None
        if not request.content_type.startswith("multipart/"):
            return fields, upload
        size = 0
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            chunks = []
            while chunk := await part.read_chunk():
                size += len(chunk)
                if size > self.max_upload_size:
                    raise web.HTTPRequestEntityTooLarge(
                        max_size=self.max_upload_size, actual_size=size
                    )
                chunks.append(chunk)
            data = b"".join(chunks)
            if part.name == "image" and part.filename is not None:
                if upload is None:
                    upload = (part.filename, data)
            elif part.name not in fields:
                fields[part.name] = data.decode(part.get_charset("utf-8"), errors="replace")
        return fields, upload


async def _faulty(
    request: web.Request,
    headers: dict[str, str],
    size: int,
    pieces: AsyncIterator[bytes],
    rate: int | None,
    cut: int | None,
) -> web.StreamResponse:
    """A body sent at `rate` bytes per second (Faults.view_bytes_per_second: a slow link; None:
    at once), of which only the first `cut` bytes are sent before the connection drops
    (Faults.view_cut_bytes: a server that dies mid-file; None: all of it)."""
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    chunk = _MAX_CHUNK if rate is None else max(
        1, min(_MAX_CHUNK, rate // _THROTTLE_WRITES_PER_SECOND))
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), 0
    async for piece in pieces:
        for offset in range(0, len(piece), chunk):
            part = piece[offset : offset + chunk]
            if cut is not None and sent + len(part) >= cut:
                await response.write(part[: cut - sent])
                assert request.transport is not None
                request.transport.close()  # no more, and no clean end
                return response
            await response.write(part)
            sent += len(part)
            if rate is not None:
                # Deadlines from the start, so the sleeps' overshoot does not add up.
                await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
    await response.write_eof()
    return response


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _file_pieces(path: str) -> AsyncIterator[bytes]:
    """The file in pieces read in a thread: the body is never whole in memory."""
    f = await asyncio.to_thread(_open_binary, path)
    try:
        while piece := await asyncio.to_thread(f.read, _MAX_CHUNK):
            yield piece
    finally:
        await asyncio.to_thread(f.close)


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")  # closed by _file_pieces
