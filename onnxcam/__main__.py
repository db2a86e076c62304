"""python -m onnxcam: the command line."""

from .cli import run

run()
