from setuptools import find_packages, setup

setup(
    name="megadeep",
    version="0.1.0",
    description="Llama pre-training with Megatron-style tensor parallelism on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["megadeep", "megadeep.*"]) + ["megadeep.ds_configs"],
    package_dir={"megadeep.ds_configs": "ds_configs"},
    package_data={"megadeep.ds_configs": ["*.json", "precision/*.json"]},
    install_requires=["torch", "deepspeed", "numpy", "pyyaml"],
    entry_points={"console_scripts": ["megadeep=megadeep.cli:main"]},
)
