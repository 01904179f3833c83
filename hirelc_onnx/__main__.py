"""`python -m hirelc_onnx` runs the CLI."""
from hirelc_onnx.cli import main

main()
