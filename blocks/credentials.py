"""SegmindCredentials: the API key (secret) and where the API lives."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from avatarflow.client import DEFAULT_BASE_URL
from avatarflow.config import ApiSettings


class SegmindCredentials(Block):
    """Key and base URLs of the p-video-avatar API (the vendor's, or a local server)."""

    _block_type_name = "Segmind Credentials"
    _block_type_slug = "segmind-credentials"
    _description = "API key and base URLs for the p-video-avatar API."

    api_key: SecretStr = Field(description="The key sent as x-api-key.")
    base_url: str = Field(default=DEFAULT_BASE_URL, description="Base URL of the API.")
    history_url: str | None = Field(
        default=None, description="Base URL of the request history (the vendor keeps it on another host)."
    )

    def settings(self) -> ApiSettings:
        backend = "segmind" if self.base_url == DEFAULT_BASE_URL else "local"
        return ApiSettings(self.base_url, self.history_url, self.api_key.get_secret_value(), backend)
