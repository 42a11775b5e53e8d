"""SourcePolicy: what untrusted flow parameters (`image`, `audio`, `calendar`) may name.

The operator selects a saved block by name with AVATARFLOW_SOURCES_BLOCK on the workers (never a
flow parameter); avatarflow.config then reads the block's fields through the Prefect API and
validates them with the same model as the AVATARFLOW_SOURCES_* variables (config.SourceFields).
The defaults are the safe ones."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from avatarflow.config import SOURCE_POLICY_BLOCK_TYPE, SourceFields


class SourcePolicy(Block):
    """The source policy of avatarflow's flows (see avatarflow.media.policy)."""

    _block_type_name = "Source Policy"
    _block_type_slug = SOURCE_POLICY_BLOCK_TYPE
    _description = ("What untrusted flow parameters may name: https URLs, s3:// in the archive or an "
                    "allowed bucket/prefix, data: URIs, local files under allowed roots.")

    local_roots: list[str] = Field(default_factory=list, description=SourceFields.model_fields["local_roots"].description)
    s3_allow: list[str] = Field(default_factory=list, description=SourceFields.model_fields["s3_allow"].description)
    allow_data: bool = Field(default=True, description=SourceFields.model_fields["allow_data"].description)
    allow_http: bool = Field(default=False, description=SourceFields.model_fields["allow_http"].description)
    allow_hosts: list[str] = Field(default_factory=list, description=SourceFields.model_fields["allow_hosts"].description)
    max_redirects: int = Field(default=5, ge=0, le=20, description=SourceFields.model_fields["max_redirects"].description)
    fetch_timeout_s: float = Field(default=30.0, gt=0, le=600,
                                   description=SourceFields.model_fields["fetch_timeout_s"].description)

    def fields(self) -> SourceFields:
        """The same settings avatarflow.config builds from the environment."""
        return SourceFields.model_validate({k: getattr(self, k) for k in SourceFields.model_fields})
