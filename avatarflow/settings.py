"""Deprecated: the settings moved to avatarflow.config (the one reader of the environment).

Kept as a thin re-export while flows/avatar_video.py still imports `from avatarflow import settings`."""

from avatarflow.config import (  # noqa: F401
    LOCAL_EXPECTED_S,
    ApiSettings,
    ArchiveSettings,
    NotConfigured,
    api_settings,
    archive_settings,
    local_services,
)

__all__ = ["LOCAL_EXPECTED_S", "ApiSettings", "ArchiveSettings", "NotConfigured", "api_settings",
           "archive_settings", "local_services"]
