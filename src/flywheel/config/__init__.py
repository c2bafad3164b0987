"""Core configuration: environment settings and the ``flywheel.yaml`` config-as-code file."""

from flywheel.config.files import ConfigError, describe_problem, load_config, load_config_text
from flywheel.config.schema import (
    CatalogModel,
    FlywheelConfig,
    Pricing,
    ProviderConfig,
    RetryPolicy,
    RouteConfig,
    RouteTarget,
)
from flywheel.config.settings import Settings, get_settings

__all__ = [
    "CatalogModel",
    "ConfigError",
    "FlywheelConfig",
    "Pricing",
    "ProviderConfig",
    "RetryPolicy",
    "RouteConfig",
    "RouteTarget",
    "Settings",
    "describe_problem",
    "get_settings",
    "load_config",
    "load_config_text",
]
