"""The image store's errors: `ImageError` and its kinds, each a `VirtualizerError` the virtualizer can let pass.

Every failure of the store (images.py) and of its import pipeline (image_import.py) is one of these, with a
reason that names the image or the source and says precisely why.
"""

from __future__ import annotations

from launcher.plugin.errors import IMAGE_FAILURE, IMAGE_IN_USE, VirtualizerError


class ImageError(VirtualizerError):
    """An image could not be provided, imported or removed; ``str(exc)`` (and ``exc.reason``) says precisely why.

    It is a `VirtualizerError` with code ``image_failure``, so the QEMU virtualizer can let it propagate."""

    def __init__(self, reason: str) -> None:
        super().__init__(IMAGE_FAILURE, reason)

    def __str__(self) -> str:
        return self.reason


class ImageInUse(ImageError):
    """`ImageStore.remove` was asked to remove an image that an instance uses (code ``image_in_use``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.code = IMAGE_IN_USE


class ImageNotFound(ImageError):
    """The image, or the source to import it from, does not exist."""

