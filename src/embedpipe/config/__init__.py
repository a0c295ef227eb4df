"""Settings per area, each option declared once (``Field(description=...)``).

The CLI derives its flags from these models, components validate their section
with them, and pipelines compile each stage's section as that step's settings.
"""

from embedpipe.config.base import (
    COMPILE_TIME,
    COMPILE_TIME_FLAG,
    NO_FLAG,
    ConfigError,
    Section,
    compile_time_keys,
    has_flag,
    is_compile_time,
)
from embedpipe.config.cluster import ClusterSettings, ImagesSettings, Toleration
from embedpipe.config.data import CatalogSettings, DedupSettings, IngestSettings, SplitSettings
from embedpipe.config.evaluate import EvaluateSettings
from embedpipe.config.mining import CombineSettings, MineSettings, ToHfSettings
from embedpipe.config.models import EmbedSettings
from embedpipe.config.publish import PublishSettings
from embedpipe.config.settings import (
    STAGE_SETTINGS,
    GlobalSettings,
    PathsSettings,
    Settings,
    check_overrides,
    load_settings,
    stage_settings,
)
from embedpipe.config.taxonomy import TaxonomySettings
from embedpipe.config.train import TrainSettings
from embedpipe.config.tune import SearchDimension, TuneSettings

__all__ = [
    "COMPILE_TIME",
    "COMPILE_TIME_FLAG",
    "NO_FLAG",
    "STAGE_SETTINGS",
    "CatalogSettings",
    "ClusterSettings",
    "CombineSettings",
    "ConfigError",
    "DedupSettings",
    "EmbedSettings",
    "EvaluateSettings",
    "GlobalSettings",
    "ImagesSettings",
    "IngestSettings",
    "MineSettings",
    "PathsSettings",
    "PublishSettings",
    "SearchDimension",
    "Section",
    "Settings",
    "SplitSettings",
    "TaxonomySettings",
    "ToHfSettings",
    "Toleration",
    "TrainSettings",
    "TuneSettings",
    "check_overrides",
    "compile_time_keys",
    "has_flag",
    "is_compile_time",
    "load_settings",
    "stage_settings",
]
