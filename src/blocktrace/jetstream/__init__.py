"""NATS JetStream: a trace's records leave the host, consumers read them anywhere.

* :mod:`.wire` the record's wire format (a sans-IO encoder and bounded decoder);
* :mod:`.conn` addresses, connection and stream options, error translation;
* :mod:`.publisher` the ordered, acknowledged, de-duplicated publisher the ``stream`` target
  drives;
* :mod:`.consumer` reading records back (replay, log save, follow, watch).

See docs/jetstream.md.
"""
