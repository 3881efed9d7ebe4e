"""Replicas: keeping a second block device equal to a traced source (docs/replica.md).

:mod:`.bitmap` (dirty regions), :mod:`.meta` (persistent metadata, generation ids, the attach
decision and split-brain refusal), :mod:`.target` (the engine both replica trace targets use).
"""
