"""A clock module whose SDK is not installed (for the missing-extra test)."""

import listener_cluster_sdk_that_is_not_installed  # noqa: F401
