"""Pipeline parallelism: the Llama decoder cut into stages for DeepSpeed's pipeline engine."""
from megadeep.pipeline.stages import PipelinedLlama, layer_specs
from megadeep.pipeline.topology import check_grid, topology

__all__ = ["PipelinedLlama", "check_grid", "layer_specs", "topology"]
