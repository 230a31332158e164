"""Work that can wait: deadline-tolerant requests answered through provider Batch APIs.

``policy`` decides which requests qualify, ``parking`` appends them to the parked topic
(the processor's hook), ``coordinator`` and ``partition`` run the jobs of each parked
partition, ``jobs`` keeps their state in a compacted topic, ``client`` talks to ``/files``
and ``/batches``, ``lines`` writes and reads the JSONL files, ``metrics`` counts it all and
``wiring`` builds the parts for the worker's runtime.
"""
