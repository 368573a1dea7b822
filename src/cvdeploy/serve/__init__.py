"""The inference server: Open Inference Protocol v2 (Triton-compatible), an image API, dynamic batching, metrics."""
