"""What a model's output means beyond classification: detection heads, segmentation maps, token layouts, CTC text
recognizers (ocr.py), and the automatic layer per task (choose.py). The modules are pure numpy (and graph reading
in choose.py); run.py is the command line's per-task pipeline."""

TASKS = ("classify", "detect", "segment", "ocr")
