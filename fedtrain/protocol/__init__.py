"""The wire both sides speak: the gRPC service definitions and stubs, the tensor and value
codec, the metrics of a result, typed refusals, and the mutual-TLS credentials."""
