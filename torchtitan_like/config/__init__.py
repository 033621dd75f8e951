"""Configuration: typed sections (job_config), TOML + CLI loading (manager), cross-key checks (validate)."""

from torchtitan_like.config.job_config import SECTIONS, JobConfig
from torchtitan_like.config.manager import config_to_dict, load_config, to_toml
from torchtitan_like.config.validate import gradient_accumulation_steps, validate_config

__all__ = ["JobConfig", "SECTIONS", "load_config", "to_toml", "config_to_dict", "validate_config",
           "gradient_accumulation_steps"]
