"""The engines under `runtime.load`: one model object (model.py, its input side feeding.py, tensors.py) over one
file per backend (tflite.py: LiteRT, onnx.py: onnxruntime, tflm.py: TensorFlow Lite Micro), and what they read
(inputs.py: image and .npy files, onnx_proto.py: ONNX files without the onnx package, sparse.py: sparse TFLite
weights) and raw.py, any model with nothing interpreted."""
