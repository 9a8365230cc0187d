"""``megadeep plan``: choose a parallel layout and ZeRO recipe for a model and cluster before spending
GPU hours, from memory and step-time models (see memory.py and perf.py)."""
