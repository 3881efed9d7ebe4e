"""``blocktrace attach``: trace the disks of a QEMU that is already running (docs/attach.md).

:mod:`.monitor` talks to QEMU's QMP (the ``qemu.qmp`` library), :mod:`.pivot` moves a disk
onto a blocktrace export and back, :mod:`.session` ties disks, exports and traces to a
:class:`~blocktrace.service.Service`.
"""
