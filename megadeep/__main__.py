import sys

from megadeep.training import preemption

if sys.argv[1:2] == ["train"]:
    preemption.install()  # first: a SLURM stop signal must never find a rank without its handler
try:
    from megadeep.cli import main

    code = main()
finally:
    preemption.ignore_from_now()  # and never find it exiting, when CPython has put the default back
raise SystemExit(code)
