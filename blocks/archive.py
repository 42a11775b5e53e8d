"""The archive as prefect-aws blocks: AwsCredentials (custom endpoint for SeaweedFS) + S3Bucket."""

from __future__ import annotations

from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.credentials import AwsClientParameters

from avatarflow.config import ArchiveSettings
from avatarflow.store import Store


def s3_bucket_block(settings: ArchiveSettings) -> S3Bucket:
    """An S3Bucket block (with its credentials) for these archive settings."""
    credentials = AwsCredentials(
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        region_name=settings.region,
        aws_client_parameters=AwsClientParameters(endpoint_url=settings.endpoint_url)
        if settings.endpoint_url else AwsClientParameters(),
    )
    return S3Bucket(bucket_name=settings.bucket, credentials=credentials, bucket_folder=settings.prefix)


def store_from_block(bucket: S3Bucket) -> Store:
    return Store(s3=bucket.credentials.get_s3_client(), bucket=bucket.bucket_name, prefix=bucket.bucket_folder or "")
