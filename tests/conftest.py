"""Shared pytest configuration for pyabouts' tests."""

# First, before any fixture imports grpc: the etcd store sets how grpc's client does its I/O
# (GRPC_EXPERIMENTS), which grpc reads once, at its import. The tests' own calls to etcd then
# go through the client as pyabouts' processes have it.
import os

import pyabouts.ipam.stores.etcd  # noqa: F401
from pyabouts.plugin.named_files import TRUSTED_DIRS_ENV

# The tests' network configs name their kubeconfigs, flat files, logs and run_dirs in temporary
# directories; the plugin processes they start (which inherit this environment) follow them
# there. tests/unit/test_named_files.py and the in-process suite's test of it run without.
os.environ[TRUSTED_DIRS_ENV] = "/tmp"

pytest_plugins = [
    "tests.machine_share",
    "tests.integration.etcd_fixtures",
    "tests.integration.kube_fixtures",
    "tests.integration.plugin_fixtures",
    "tests.integration.reconciler_env",
]
