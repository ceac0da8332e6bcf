from latdiffunet.imageio.sitk_io import (
    SUPPORTED_FILE_ENDINGS,
    ImageGeometry,
    read_image,
    read_images_as_channels,
    read_label,
    write_segmentation,
    write_image,
)

__all__ = [
    "SUPPORTED_FILE_ENDINGS",
    "ImageGeometry",
    "read_image",
    "read_images_as_channels",
    "read_label",
    "write_segmentation",
    "write_image",
]
