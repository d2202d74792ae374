"""Images -> the URLs the server accepts: ``http(s)://`` (fetched by the server) or base64 ``data:``.

Accepted inputs: an ``http(s)://`` or ``data:`` URL (passed through), a local path (``str`` or
``Path``), raw bytes, a binary file object, or a PIL image. Pillow is optional and never imported
here: a PIL image can only exist if the caller already imported PIL, so ``sys.modules`` tells.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

if TYPE_CHECKING:  # for type checkers only: Pillow stays optional at run time
    from PIL.Image import Image as PILImage

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, "PILImage"]

# Magic numbers of the formats the server decodes (PNG, JPEG, GIF, WEBP, BMP).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


def sniff_mime(data: bytes) -> str | None:
    """The image mime type from the first bytes, or ``None`` if not a known image format."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), None)


def data_url(data: bytes, mime: str | None = None) -> str:
    """Bytes -> ``data:<mime>;base64,...``; the mime type is sniffed when not given."""
    mime = mime or sniff_mime(data)
    if mime is None:
        raise ValueError("these bytes are not a recognised image (PNG, JPEG, GIF, WEBP or BMP)")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _is_pil_image(obj: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(obj, pil.Image)


def _pil_bytes(image: Any) -> bytes:
    """PNG-encode a PIL image (lossless, so the server sees exactly these pixels)."""
    if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
        image = image.convert("RGB")  # e.g. CMYK, which PNG cannot store
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _path_url(path: Path) -> str:
    data = path.read_bytes()
    guessed = mimetypes.guess_type(path.name)[0]
    # The content decides; the suffix is only a fallback (files are often misnamed).
    mime = sniff_mime(data) or (guessed if guessed and guessed.startswith("image/") else None)
    if mime is None:
        raise ValueError(f"{path} is not a recognised image (PNG, JPEG, GIF, WEBP or BMP)")
    return data_url(data, mime)


def to_image_url(image: ImageInput) -> str:
    """Any accepted image input -> a URL for an ``image_url`` content part."""
    if isinstance(image, str):
        if image[:8].lower().startswith(("http://", "https://", "data:")):
            return image
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image {image!r} is neither an http(s)/data URL nor an existing file")
        return _path_url(path)
    if isinstance(image, os.PathLike):
        return _path_url(Path(image).expanduser())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return data_url(bytes(image))
    if _is_pil_image(image):
        return data_url(_pil_bytes(image), "image/png")
    if hasattr(image, "read"):
        return data_url(image.read())
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image or a URL")


def image_part(image: ImageInput, detail: str | None = None) -> dict:
    """An OpenAI ``image_url`` content part."""
    url: dict[str, str] = {"url": to_image_url(image)}
    if detail:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}


def user_message(text: str, images: list[ImageInput] | None = None) -> dict:
    """A user turn: the images first (where the model sees them), then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*(image_part(im) for im in images), {"type": "text", "text": text}]}
