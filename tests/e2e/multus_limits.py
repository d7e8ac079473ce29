"""What Multus v4.2.3 cannot do, as pytest markers: the tests that show it run in both end-to-end
suites (the kubelet stand-in and the local cluster)."""

import pytest

#: raises=AssertionError: the pod must come up and the route be the wrong one; anything else
#: that fails is a failure.
MULTUS_CANNOT_REPLACE_THE_DEFAULT_ROUTE = pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Multus v4.2.3 cannot replace the default route: its DeleteDefaultGW looks for "
    "routes whose Dst is nil, which netlink v1.3.1 never returns (upstream multus-cni PR #1552, "
    "open); adding the requested one then fails with EEXIST, which Multus ignores",
)
