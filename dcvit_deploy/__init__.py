"""dcvit-deploy: few-shot DC-ViT compression to a dense family of ViTs, deployed under a latency
budget. Importing the package imports no heavy or optional dependency (torch, onnxruntime,
tensorrt); submodules import what they need."""

__version__ = "0.1.0"
