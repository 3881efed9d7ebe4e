"""NATS JetStream: a trace's records leave the host, consumers read them anywhere.

* :mod:`.wire` the record's wire format (a sans-IO encoder and bounded decoder);
* :mod:`.conn` addresses, connection and stream options, error translation;
* :mod:`.publisher` the ordered, acknowledged, de-duplicated publisher the ``stream`` target
  drives;
* :mod:`.consumer` reading records back (replay, log save, follow, watch).

Records are the stream's one type, :class:`blocktrace.stream.records.Record`.  Layering
(tests/test_layering.py): this package depends only on ``errors`` and ``stream``, beside
``logwrites``, ``replica`` and ``ext4``; the ``stream`` target
(:mod:`blocktrace.targets.stream`) and the consumer commands (:mod:`blocktrace.cli.jetstream`)
build on it.  See docs/jetstream.md.
"""
