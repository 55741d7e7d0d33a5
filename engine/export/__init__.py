"""Export and compile: ONNX graphs of the three components (`contracts`, `onnx_export`), TensorRT
engines built from them (`tensorrt_build`), and the on-disk cache both live in (`cache`), keyed by
everything they depend on. Import the submodules; this package stays import-light for the CLI."""
