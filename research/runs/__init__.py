"""Run I/O: Python-file configs with validation (``config``) and metrics logging (``metrics``:
JSONL, TensorBoard, progress bar, training curves)."""
