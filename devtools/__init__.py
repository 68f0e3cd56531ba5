"""Tooling that is not shipped (not in the wheel or the image): the local multi-node dev
cluster, the demo, the failover and fault benchmarks with their writer and crash checker.
Imported from a source checkout only (``make demo``, ``tandem cluster``, ``tandem bench``)."""
