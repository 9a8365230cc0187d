"""The typed run configuration: schema, loading with overrides, validation, DeepSpeed composition."""
from megadeep.config.load import dump_json, from_dict, load_config, to_dict
from megadeep.config.schema import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megadeep.config.validate import resolve

__all__ = [
    "CheckpointConfig", "DataConfig", "DeepSpeedConfig", "LogConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "RunConfig", "TrainConfig", "dump_json", "from_dict", "load_config", "resolve",
    "to_dict",
]
