"""Broker sources: actors that consume a broker's stream and feed the ingest pipeline.

`base` holds what every source shares (entries, completions, the position chain, the transport
interface), `parse` turns an entry's fields into the same typed requests as the WebSocket edge,
`actor` runs one source (read, validate, commit with its position, acknowledge, report) with the
pieces in `units` and the figures of `status`, and `redis_stream` is the Redis Streams transport.
"""
