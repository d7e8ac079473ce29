"""Shared pytest configuration for pyabouts' tests."""

# First, before any fixture imports grpc: the etcd store sets how grpc's client does its I/O
# (GRPC_EXPERIMENTS), which grpc reads once, at its import. The tests' own calls to etcd then
# go through the client as pyabouts' processes have it.
import pyabouts.ipam.stores.etcd  # noqa: F401

pytest_plugins = [
    "tests.machine_share",
    "tests.integration.etcd_fixtures",
    "tests.integration.kube_fixtures",
    "tests.integration.plugin_fixtures",
    "tests.integration.reconciler_env",
]
