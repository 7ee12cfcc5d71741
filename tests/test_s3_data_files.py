"""The S3 driver's botocore data (node/storage/s3.py: _S3DataFiles): less memory, the same endpoints."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config as BotoConfig

from node.storage.s3 import _ENDPOINT_SERVICES, _boto3_session


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"])
@pytest.mark.parametrize("signature", ["s3v4", "s3"])
def test_trimmed_botocore_data_resolves_and_signs_s3_urls_as_botocore_does(region, signature):
    config = BotoConfig(region_name=region, signature_version=signature)
    keys = {"aws_access_key_id": "a", "aws_secret_access_key": "b", "config": config}
    full = boto3.session.Session().client("s3", **keys)
    trimmed = _boto3_session().client("s3", **keys)
    assert trimmed.meta.endpoint_url == full.meta.endpoint_url
    params = {"Params": {"Bucket": "bucket", "Key": "a/b"}, "ExpiresIn": 60}
    assert (
        trimmed.generate_presigned_url("get_object", **params).split("?")[0]
        == full.generate_presigned_url("get_object", **params).split("?")[0]
    )


def test_trimmed_endpoints_keep_only_the_services_an_s3_client_looks_up():
    loader = _boto3_session()._session.get_component("data_loader")
    endpoints = loader.load_data("endpoints")
    assert {name for partition in endpoints["partitions"] for name in partition["services"]} <= _ENDPOINT_SERVICES
    assert all(
        "s3" in partition["services"] for partition in endpoints["partitions"] if partition["partition"] == "aws"
    )
    model = loader.load_service_model("s3", "service-2")
    assert model["operations"]["PutObject"]["documentation"] == ""
