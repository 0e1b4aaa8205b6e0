"""The core's run configuration: typed dataclasses (schema), strict conversion from plain data (convert) and YAML
files (yaml_io). This face re-exports their public names; modules inside import from the sibling that owns a name."""

from ackd_search.config.convert import (
    bounded,
    bounds,
    check_value,
    convert,
    field_info,
    from_dict,
    get_path,
    set_path,
    strip_optional,
    to_dict,
)
from ackd_search.config.schema import (
    METHOD_WEIGHTS,
    MODEL_FIELD,
    PATH_FIELDS,
    AckdConfig,
    DataConfig,
    DistillConfig,
    DkdConfig,
    OptimConfig,
    RunConfig,
    TeacherConfig,
    dkd_distill,
    kd_distill,
    reference_distill,
    with_absolute_paths,
)
from ackd_search.config.yaml_io import load_run_config, load_yaml, save_run_config
from ackd_search.errors import ConfigError

__all__ = [
    "METHOD_WEIGHTS", "MODEL_FIELD", "PATH_FIELDS", "AckdConfig", "ConfigError", "DataConfig", "DistillConfig",
    "DkdConfig", "OptimConfig", "RunConfig", "TeacherConfig", "bounded", "bounds", "check_value", "convert",
    "dkd_distill", "field_info", "from_dict", "get_path", "kd_distill", "load_run_config", "load_yaml",
    "reference_distill", "save_run_config", "set_path", "strip_optional", "to_dict", "with_absolute_paths",
]
