"""The config: a typed schema with defaults in code, YAML loading and dotted ``--set`` overrides.

- ``schema``: the pydantic sections (model, data, freeze, optim, train) and their defaults and ranges;
- ``loading``: YAML files, ``--set KEY=VALUE``, path resolution, and error messages that name file, line and key.

No torch is imported here, so config errors are reported at once.
"""

from finetune.config.loading import all_keys, config_error, load_config
from finetune.config.schema import Config

__all__ = ["Config", "all_keys", "config_error", "load_config"]
