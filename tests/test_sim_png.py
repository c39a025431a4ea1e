"""The simulator's PNG encoding: memoised, with text chunks spliced in, byte for byte Pillow's."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from comfyfleet.sim import png

TEXT = [
    ("prompt", json.dumps({"1": {"class_type": "EmptyImage", "inputs": {"width": 3}}})),
    ("workflow", "caf\u00e9"),  # latin-1: still tEXt
    ("note", "\u6f22\u5b57"),  # not latin-1: iTXt, as PngInfo.add_text chooses
]


def pillow_png(image: Image.Image, compress_level: int, text: list[tuple[str, str]]) -> bytes:
    """What ComfyUI's SaveImage writes: Image.save with a PngInfo of the text."""
    info = PngInfo()
    for key, value in text:
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


@pytest.mark.parametrize("compress_level", [1, 4])
@pytest.mark.parametrize(
    ("mode", "size", "color"),
    [("RGB", (64, 48), (0x33, 0x66, 0xCC)), ("RGB", (1, 1), (0, 0, 0)), ("L", (5, 7), 200)],
)
def test_encoding_is_pillows(
    mode: str, size: tuple[int, int], color: int | tuple[int, int, int], compress_level: int
) -> None:
    image = Image.new(mode, size, color)
    encoded = png.with_chunks(png.encode(image, compress_level), png.text_chunks(TEXT))
    assert encoded == pillow_png(image, compress_level, TEXT)
    assert png.with_chunks(png.encode(image, compress_level), b"") == pillow_png(
        image, compress_level, []
    )


def test_images_are_told_apart_by_their_pixels() -> None:
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    same = Image.new("RGB", (16, 16), (1, 2, 3))
    changed = image.copy()
    changed.putpixel((15, 15), (1, 2, 4))
    assert png.encode(image, 4) == png.encode(same, 4)
    with Image.open(io.BytesIO(png.encode(changed, 4))) as decoded:
        assert decoded.getpixel((15, 15)) == (1, 2, 4)
    # Same bytes, another shape.
    with Image.open(io.BytesIO(png.encode(Image.new("RGB", (8, 32), (1, 2, 3)), 4))) as other:
        assert other.size == (8, 32)
    # Same palette indices, another palette.
    red, blue = Image.new("P", (4, 4), 0), Image.new("P", (4, 4), 0)
    red.putpalette([255, 0, 0])
    blue.putpalette([0, 0, 255])
    with Image.open(io.BytesIO(png.encode(blue, 4))) as decoded:
        assert png.encode(red, 4) != png.encode(blue, 4)
        assert decoded.convert("RGB").getpixel((0, 0)) == (0, 0, 255)


def test_written_without_the_images_info() -> None:
    """ComfyUI saves an image made from a tensor: no ICC profile, whatever the input had."""
    image = Image.new("RGB", (4, 4), (9, 9, 9))
    image.info["icc_profile"] = b"not really a profile"
    assert png.encode(image, 4) == pillow_png(Image.new("RGB", (4, 4), (9, 9, 9)), 4, [])


def test_keys_that_are_not_latin1_raise_as_in_pillow() -> None:
    with pytest.raises(UnicodeEncodeError):
        png.text_chunks([("\u6f22", "value")])
