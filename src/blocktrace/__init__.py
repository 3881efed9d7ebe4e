"""blocktrace: serve virtual disks over NBD and record their write stream precisely.

The package is layered like QEMU's block layer and nbdkit:

* ``nbd/``       the NBD protocol as a sans-IO core, plus thin asyncio server and client adapters;
* ``block/``     the block-device interface, its backends (raw file, remote NBD) and filter base;
* ``trace/``     the trace filter, its ordering and delivery, and the trace targets;
* ``logwrites/`` the dm-log-writes log format: reader, writer, replay;
* ``qmp/``       a QMP-compatible control socket (sans-IO core + asyncio server);
* ``ext4/``      the ext4 model that turns a write stream into file-level events;
* ``cli/``       one module per command; argument handling only.
"""

__version__ = "0.1.0"
