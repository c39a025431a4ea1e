"""Output storage: S3 when configured, else a local directory (DESIGN §6)."""

from comfyfleet.settings import Settings
from comfyfleet.storage.base import (
    NotInStorage,
    SignedUrl,
    Storage,
    StorageError,
    content_type_for,
    output_key,
)
from comfyfleet.storage.local import LocalStorage
from comfyfleet.storage.s3 import S3Storage

__all__ = ["LocalStorage", "NotInStorage", "S3Storage", "SignedUrl", "Storage", "StorageError",
           "content_type_for", "open_storage", "output_key"]


async def open_storage(settings: Settings, url_signing_key: bytes) -> Storage:
    if settings.storage_kind == "s3":
        return await S3Storage.open(settings)
    return LocalStorage(
        settings.data_dir / "outputs",
        signing_key=url_signing_key,
        base_url=lambda: settings.public_base_url,
        url_ttl=settings.s3_url_ttl,
    )
