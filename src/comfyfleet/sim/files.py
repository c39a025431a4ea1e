"""The three ComfyUI directories and the path rules of /view, the uploads and SaveImage.

Everything here is ported from ComfyUI's folder_paths.py and server.py so that the simulator
accepts, rejects and names files exactly like a real server. All functions do blocking file
I/O: callers run them through asyncio.to_thread.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

DIR_TYPES = ("output", "input", "temp")

# ComfyUI forces these to download instead of rendering them in a browser.
_UNSAFE_CONTENT_TYPES = frozenset(
    {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}
)


@dataclass(frozen=True)
class Folders:
    """`<root>/output`, `<root>/input` and `<root>/temp`; `root` is absolute."""

    root: str

    @property
    def output(self) -> str:
        return os.path.join(self.root, "output")

    @property
    def input(self) -> str:
        return os.path.join(self.root, "input")

    @property
    def temp(self) -> str:
        return os.path.join(self.root, "temp")

    def by_type(self, dir_type: str) -> str | None:
        return os.path.join(self.root, dir_type) if dir_type in DIR_TYPES else None

    def prepare(self) -> None:
        """Create the directories; temp starts empty, as at every ComfyUI start."""
        self.wipe_temp()
        for path in (self.output, self.input, self.temp):
            os.makedirs(path, exist_ok=True)

    def wipe_temp(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)

    def annotated(self, name: str) -> tuple[str, str | None]:
        """Split `"x.png [output]"` into the name and the directory the suffix selects.

        Like ComfyUI, this tests for `[type]` and also strips the character before it.
        """
        for dir_type in DIR_TYPES:
            if name.endswith(f"[{dir_type}]"):
                return name[: -len(dir_type) - 3], self.by_type(dir_type)
        return name, None

    def image_input_path(self, name: str) -> str | None:
        """Path of a LoadImage `image` value (relative to input unless annotated).

        Deviation: ComfyUI would follow `../` here; the simulator refuses paths that leave
        their directory and reports them as missing files.
        """
        name, base = self.annotated(name)
        base = base or self.input
        path = os.path.abspath(os.path.join(base, name))
        return path if os.path.commonpath((base, path)) == base else None

    def image_input_exists(self, name: str) -> bool:
        path = self.image_input_path(name)
        return path is not None and os.path.exists(path)

    def input_images(self) -> list[str]:
        """Files offered by LoadImage's combo: images at the top of the input directory."""
        names = (
            entry.name
            for entry in os.scandir(self.input)
            if entry.is_file() and (mimetypes.guess_type(entry.name)[0] or "").startswith("image")
        )
        return sorted(names)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- GET /view -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewTarget:
    path: str
    filename: str
    content_type: str


def resolve_view(folders: Folders, query: Mapping[str, str]) -> ViewTarget | int:
    """The file a /view query names, or the HTTP status ComfyUI answers (checks in its order)."""
    if "filename" not in query:
        return 404
    filename, directory = folders.annotated(query["filename"])
    if not filename:
        return 400
    if filename[0] == "/" or ".." in filename:
        return 400
    if directory is None:
        directory = folders.by_type(query.get("type", "output"))
    if directory is None:
        return 400
    if "subfolder" in query:
        full = os.path.join(directory, query["subfolder"])
        if os.path.commonpath((os.path.abspath(full), directory)) != directory:
            return 403
        directory = full
    filename = os.path.basename(filename)
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        return 404
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in _UNSAFE_CONTENT_TYPES:
        content_type = "application/octet-stream"
    return ViewTarget(path, filename, content_type)


def needs_rendering(preview: str | None, channel: str) -> bool:
    """Whether /view re-encodes the image; otherwise the file is served as is."""
    return preview is not None or channel in ("rgb", "a")


def render_view(path: str, preview: str | None, channel: str) -> tuple[bytes, str]:
    """The image re-encoded for `preview=` and/or `channel=`, and its content type."""
    buffer = BytesIO()
    with Image.open(path) as img:
        if preview is not None:
            parts = preview.split(";")
            image_format = parts[0]
            if image_format not in ("webp", "jpeg") or "a" in channel:
                image_format = "webp"
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            out = img.convert("RGB") if image_format == "jpeg" or channel == "rgb" else img
            out.save(buffer, format=image_format, quality=quality)
            return buffer.getvalue(), f"image/{image_format}"
        if channel == "rgb":
            rgb = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
            rgb.save(buffer, format="PNG")
        else:
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            alpha_img = Image.new("RGBA", img.size)
            alpha_img.putalpha(alpha)
            alpha_img.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


# --- POST /upload/image and /upload/mask -----------------------------------------------------


def store_upload(
    directory: str,
    filename: str,
    subfolder: str,
    data: bytes,
    overwrite: bool,
    write: Callable[[str], None] | None = None,
) -> str | None:
    """Store an upload and return its final name, or None (HTTP 400) if the path escapes.

    Without `overwrite`, an existing file with the same bytes is reused as is and a different
    one makes the upload `name (1).ext`, `name (2).ext`, ... `write(path)`, if given, stores
    the file instead of writing `data` as it is.
    """
    folder = os.path.join(directory, os.path.normpath(subfolder))
    path = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((directory, path)) != directory:
        return None
    os.makedirs(folder, exist_ok=True)
    if not overwrite:
        stem, ext = os.path.splitext(filename)
        digest = hashlib.sha256(data).hexdigest()
        i = 1
        while os.path.exists(path):
            if file_sha256(path) == digest:
                return filename
            filename = f"{stem} ({i}){ext}"
            path = os.path.join(folder, filename)
            i += 1
    if write is not None:
        write(path)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return filename


def write_masked(folders: Folders, original_ref: str | None, mask: bytes, path: str) -> None:
    """/upload/mask: the referenced image with the upload's alpha channel, saved at `path`
    with the original's PNG text chunks.

    As in ComfyUI, a reference that is not JSON, or an upload that is not an image, raises
    (HTTP 500), while a reference that escapes its directory or names no file writes nothing
    and the upload still answers 200.
    """
    if original_ref is None:
        raise TypeError("the original_ref field is missing")
    ref = json.loads(original_ref)
    filename, directory = folders.annotated(ref["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return
    directory = directory or folders.by_type(ref.get("type", "output"))
    if directory is None:
        return
    subfolder = ref.get("subfolder", "")
    if subfolder:
        full = os.path.join(directory, subfolder)
        if os.path.commonpath((os.path.abspath(full), directory)) != directory:
            return
        directory = full
    source = os.path.join(directory, filename)
    if not os.path.isfile(source):
        return
    with Image.open(source) as original:
        info = PngInfo()
        for key, value in getattr(original, "text", {}).items():
            info.add_text(key, value)
        result = original.convert("RGBA")
    with Image.open(BytesIO(mask)) as uploaded:
        alpha = uploaded.convert("RGBA").getchannel("A")
    result.putalpha(alpha)  # a mask of another size raises, as in ComfyUI
    result.save(path, compress_level=4, pnginfo=info)


def pad_file(path: str, size: int) -> None:
    """Grow a file to `size` bytes with zeros at its end (PNG decoders stop at IEND).

    The zeros are a hole in a sparse file: however big, they cost no write time, no memory and
    almost no disk, yet reading the file (as /view does) yields every byte. A file already
    that big is left alone.
    """
    if os.path.getsize(path) < size:
        os.truncate(path, size)


# --- SaveImage naming ------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveTarget:
    folder: str
    base: str
    counter: int
    subfolder: str


def save_target(prefix: str, output_dir: str, width: int, height: int) -> SaveTarget:
    """folder_paths.get_save_image_path: subfolder from the prefix, next free counter.

    The counter is 1 + the highest `<base>_<n>_...` in the folder, recomputed from the listing,
    so deleting the newest file makes its number come back (as on a real server).
    """
    if "%" in prefix:
        prefix = _substitute_vars(prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    base = os.path.basename(os.path.normpath(prefix))
    folder = os.path.join(output_dir, subfolder)
    folder_abs = os.path.abspath(folder)
    common = os.path.commonpath((output_dir, folder_abs))
    if common != output_dir:
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {folder_abs}"
            f"\n         output_dir: {output_dir}"
            f"\n         commonpath: {common}"
        )
    try:
        counters = [_counter_of(name, base) for name in os.listdir(folder) if _has_base(name, base)]
        counter = max(counters, default=0) + 1
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        counter = 1
    return SaveTarget(folder, base, counter, subfolder)


def _has_base(name: str, base: str) -> bool:
    head = name[: len(base) + 1]
    return os.path.normcase(head[:-1]) == os.path.normcase(base) and head[-1:] == "_"


def _counter_of(name: str, base: str) -> int:
    try:
        return int(name[len(base) + 1 :].split("_")[0])
    except ValueError:
        return 0


def _substitute_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}",
        "%day%": f"{now.tm_mday:02}",
        "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}",
        "%second%": f"{now.tm_sec:02}",
    }
    for var, value in values.items():
        prefix = prefix.replace(var, value)
    return prefix
