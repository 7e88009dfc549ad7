"""Inference: choose a trained model for each case's modalities and predict with nnU-Net's predictor.

``models`` (light) finds model folders and applies the selection rules; ``predict`` (imports nnU-Net lazily) reads the
cases, zero-fills the absent modality channels, predicts and writes the segmentations and a log; ``openvino_backend``
runs each network with OpenVINO inside nnU-Net's predictor (``--backend openvino``).
"""

BACKENDS = ("torch", "openvino")
"""What runs the networks inside nnU-Net's predictor: torch (the default) or OpenVINO (an optional extra, CPU)."""
