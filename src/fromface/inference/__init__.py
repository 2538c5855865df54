"""The product: FaceRecognizer (detect, align, embed, verify), the gallery, the ONNX backend and drawing."""
