"""Shared pytest configuration for pyabouts' tests."""

pytest_plugins = [
    "tests.machine_share",
    "tests.integration.etcd_fixtures",
    "tests.integration.kube_fixtures",
    "tests.integration.plugin_fixtures",
    "tests.integration.reconciler_env",
]
