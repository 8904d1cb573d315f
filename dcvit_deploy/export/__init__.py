"""ONNX export and verification (:mod:`.onnx`) and precision-converted graphs (:mod:`.fp16`)."""
