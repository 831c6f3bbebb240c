"""The model registry: numbered versions of model bundles, their lineage, aliases
with an audit trail, and model references (``digits``, ``digits/3``,
``digits@champion``). Never imports torch, Lightning or onnx.

```python
from cycleml.registry import Registry

registry = Registry(root="registry")  # records in registry/registry.db (SQLite)
version, created = registry.register("bundles/digits/1", description="first")
registry.set_alias("digits", "champion", version.version)
path, record = registry.resolve("digits@champion")
```
"""

from cycleml.registry.aliases import ANY
from cycleml.registry.errors import AliasConflict, GateRefused, RegistryError
from cycleml.registry.model_registry import CHAMPION, DB_FILE, Registry
from cycleml.registry.records import ARCHIVED, READY, AliasMove, Evaluation, ModelVersion
from cycleml.registry.refs import ModelRef, check_alias, check_name, parse_model_ref

__all__ = [
    "ANY",
    "ARCHIVED",
    "CHAMPION",
    "DB_FILE",
    "READY",
    "AliasConflict",
    "AliasMove",
    "Evaluation",
    "GateRefused",
    "ModelRef",
    "ModelVersion",
    "Registry",
    "RegistryError",
    "check_alias",
    "check_name",
    "parse_model_ref",
]
