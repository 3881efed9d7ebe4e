"""Block devices: the interface, its backends and the filter base class."""

from blocktrace.block.device import BlockDevice, Extent, ExtentFlags, ReadableBuffer

__all__ = ["BlockDevice", "Extent", "ExtentFlags", "ReadableBuffer"]
