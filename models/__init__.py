"""Detectors: the interface, the Ultralytics (torch) and ONNX Runtime
backends, the model registry and the training wrapper. torch and ultralytics
load only when a backend is created."""
