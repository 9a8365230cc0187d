"""The scripts in the top-level launch/ are what the generator writes today."""
import subprocess
import sys

from tests.helpers import ROOT


def test_launch_examples_match_the_generator(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megadeep", "launch", "examples", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["deepspeed_hostfile.sh", "sbatch_2x8.sh", "tiny_2x8.json", "torchrun_1node.sh"]
    committed = sorted(p.name for p in (ROOT / "launch").iterdir() if p.name != "README.md")
    assert committed == generated, "launch/ holds a file the generator does not write"
    for name in generated:
        assert (ROOT / "launch" / name).read_text() == (tmp_path / name).read_text(), \
            f"launch/{name} differs from the generator: run `megadeep launch examples`"
        if name.endswith(".sh"):
            subprocess.run(["bash", "-n", str(tmp_path / name)], check=True)
    sbatch = (tmp_path / "sbatch_2x8.sh").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch and "TP=2 × DP=8" in sbatch
