"""Reading ONNX models and finding what to explain in them (layers, logits, shapes)."""
