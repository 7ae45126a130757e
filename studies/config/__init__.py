"""A study config: its typed sections, `${VAR}` interpolation, `--set` overrides, loading and checks."""

from studies.config.interpolation import interpolate
from studies.config.loader import LoadedConfig, apply_override, check_consistency, load_config
from studies.config.sections import StudyConfig

__all__ = ["LoadedConfig", "StudyConfig", "apply_override", "check_consistency", "interpolate", "load_config"]
