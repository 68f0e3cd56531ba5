"""CSI conformance suite: every supported RPC against a real local tandem cluster."""
