"""Configuration: typed schema, composition from configs/, validation, --help text."""
from .load import CONFIGS_DIR, ConfigError, group_options, load_config
from .validate import validate_config
from .help import help_text

__all__ = ["CONFIGS_DIR", "ConfigError", "group_options", "load_config", "validate_config", "help_text"]
