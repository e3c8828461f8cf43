"""Job definitions: container properties from decorators, named by their hash."""

from __future__ import annotations

from typing import Any

import pytest

from millstream.deploy.batchjob import ContainerDefaults, bootstrap_command, container_properties, job_definition_name
from millstream.errors import DeployError

DEFAULTS = ContainerDefaults(image="img:1", environment={"MILLSTREAM_DATASTORE_TYPE": "s3"})


def node(*decorators: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"name": "train", "decorators": [{"name": n, "attributes": a} for n, a in decorators]}


def test_the_larger_of_batch_and_resources_wins() -> None:
    props = container_properties(node(("batch", {"cpu": 2, "memory": 1000, "gpu": 0}),
                                      ("resources", {"cpu": 1, "memory": 8000, "gpu": 2})), DEFAULTS)
    assert props["resourceRequirements"] == [{"type": "VCPU", "value": "2"}, {"type": "MEMORY", "value": "8000"},
                                             {"type": "GPU", "value": "2"}]


def test_environment_image_roles_and_command() -> None:
    props = container_properties(node(("environment", {"vars": {"K": "v"}}),
                                      ("batch", {"image": "gpu:3", "iam_role": "arn:role/job"})), DEFAULTS)
    assert props["image"] == "gpu:3" and props["jobRoleArn"] == "arn:role/job"
    assert props["environment"] == [{"name": "K", "value": "v"}, {"name": "MILLSTREAM_DATASTORE_TYPE", "value": "s3"}]
    assert props["command"] == bootstrap_command("python3")
    assert props["command"][3:7] == ["--package", "Ref::package", "--module", "Ref::module"]


def test_the_name_is_a_hash_of_the_properties() -> None:
    plain = container_properties(node(), DEFAULTS)
    same = container_properties(node(("retry", {"times": 2, "minutes_between_retries": 0})), DEFAULTS)
    bigger = container_properties(node(("resources", {"cpu": 4})), DEFAULTS)
    assert job_definition_name(plain) == job_definition_name(same)  # @retry is not the container's business
    assert job_definition_name(plain) != job_definition_name(bigger)
    assert job_definition_name(plain).startswith("millstream-") and len(job_definition_name(plain)) == 31


def test_no_image_is_refused() -> None:
    with pytest.raises(DeployError, match=r"no container image: set stepfunctions\.image"):
        container_properties(node(), ContainerDefaults())
