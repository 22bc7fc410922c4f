"""A worker process: one engine behind ZeroMQ, in the prefill, decode or colocated role."""
