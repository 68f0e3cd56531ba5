"""Generated gRPC stubs: build output of proto/generate.py; never edit by hand."""
