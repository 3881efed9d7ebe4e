"""Crash-consistency checking of a recorded write log (``blocktrace crashcheck``/``record``).

* :mod:`.points`: which entries are crash points (flush, FUA, mark, every N, all);
* :mod:`.overlay`: the base image under one replay layer, copy-on-write views per point;
* :mod:`.attach`: a view as a file (nbdfuse) and a loop device, torn down reliably;
* :mod:`.checkers`: ext4, XFS, FAT and ``--check CMD``;
* :mod:`.runner`: the single forward replay, parallel checks, bisection;
* :mod:`.report`: the report (ext4 introspection of the failing transaction);
* :mod:`.record`: a workload on a scratch disk, traced, then checked.

See ``docs/crashcheck.md``.
"""
