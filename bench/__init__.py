"""`make bench`: the reactor measured side by side with the raw copy-verify-delete limit and with peers.

Not a test and not part of the service: it starts its own PostgreSQL and MinIO on loopback, runs each row
on each workload, prints one markdown table and writes it to bench/results/latest.md.
"""
