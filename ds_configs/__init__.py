"""DeepSpeed ZeRO recipes, installed as package data of megadeep (see megadeep.config.deepspeed)."""
