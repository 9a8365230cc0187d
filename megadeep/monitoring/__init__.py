"""Seeing what training does: FLOPs and MFU, memory, communication volume, TensorBoard, plots."""
