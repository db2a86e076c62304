"""python -m onnxcam: the command line."""

from .cli import main

main(prog_name="onnxcam")
