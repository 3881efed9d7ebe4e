"""Target types, one module each: the composition layer of the stream.

Each module that defines ``TARGET_TYPE`` (a :class:`~blocktrace.stream.schema.TargetType`) is
a target type; :func:`blocktrace.stream.registry.targets` discovers them, and the CLI, QMP
and ``--help`` are generated from their declarations.  A target module may build on any
lower package (``logwrites``, ``replica``, ``ext4``, ``block``); nothing below imports a
target module.  :mod:`.memory` is the in-process target of tests (not a type: it has no
``TARGET_TYPE``).
"""
