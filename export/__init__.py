"""Export of the deploy network (ONNX, TensorRT): see issue 8; nothing is exported from here yet."""
