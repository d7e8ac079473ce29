import netaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.ipam.pool import PoolId
from pyabouts.ipam.ranges import AddressRange, RangeError, build_range, parse_address

V4 = PoolId("", 4)
V6 = PoolId("", 6)


def make(
    text: str,
    start: str | None = None,
    end: str | None = None,
    exclude: list[str] | None = None,
) -> AddressRange:
    pool = V6 if ":" in text else V4
    return build_range(text, range_start=start, range_end=end, exclude=exclude or [], pool=pool)


def ip(text: str) -> int:
    return int(netaddr.IPAddress(text))


def test_a_cidr_with_host_bits_is_its_network_without_network_and_broadcast() -> None:
    rng = make("192.0.2.77/24")
    assert str(rng.network) == "192.0.2.0/24"
    assert rng.spans == ((ip("192.0.2.1"), ip("192.0.2.254")),)
    assert rng.size == 254


def test_start_end_prefix_syntax_sets_both_bounds() -> None:
    rng = make("192.0.2.10-192.0.2.20/24")
    assert rng.spans == ((ip("192.0.2.10"), ip("192.0.2.20")),)
    assert rng.prefixlen == 24


def test_start_end_prefix_refuses_a_start_outside_the_network() -> None:
    with pytest.raises(RangeError, match="outside"):
        make("192.0.3.10-192.0.2.20/24")


def test_range_start_and_end_narrow_the_range_and_out_of_range_values_are_ignored() -> None:
    assert make("10.0.0.0/24", "10.0.0.100", "10.0.0.110").spans == (
        (ip("10.0.0.100"), ip("10.0.0.110")),
    )
    assert make("10.0.0.0/24", "10.9.0.100", "11.0.0.1").spans == (
        (ip("10.0.0.1"), ip("10.0.0.254")),
    )


def test_range_start_on_the_network_address_still_skips_it() -> None:
    assert make("10.0.0.0/24", "10.0.0.0").first == ip("10.0.0.1")


def test_excluded_cidrs_and_bare_ips_are_skipped_whole() -> None:
    rng = make("10.0.0.0/24", exclude=["10.0.0.0/28", "10.0.0.20", "10.0.0.100/30"])
    assert rng.spans == (
        (ip("10.0.0.16"), ip("10.0.0.19")),
        (ip("10.0.0.21"), ip("10.0.0.99")),
        (ip("10.0.0.104"), ip("10.0.0.254")),
    )
    assert not rng.contains(ip("10.0.0.5"))
    assert not rng.contains(ip("10.0.0.102"))
    assert rng.contains(ip("10.0.0.104"))


def test_dot_zero_inside_a_larger_range_is_usable() -> None:
    rng = make("10.0.0.0/16")
    assert rng.contains(ip("10.0.1.0"))
    assert rng.contains(ip("10.0.255.0"))
    assert not rng.contains(ip("10.0.0.0"))
    assert not rng.contains(ip("10.0.255.255"))


@pytest.mark.parametrize(
    "text", ["10.0.0.0/31", "10.0.0.1/32", "2001:db8::/127", "2001:db8::1/128"]
)
def test_ranges_without_usable_addresses_give_nothing_and_say_why(text: str) -> None:
    rng = make(text)
    assert (rng.spans, rng.size) == ((), 0) and "no usable address" in rng.unusable
    assert not rng.contains(int(rng.network.first)) and rng.in_network(int(rng.network.last))


def test_everything_excluded_gives_nothing_but_still_reaches_its_network() -> None:
    rng = make("10.0.0.0/29", exclude=["10.0.0.0/29"])
    assert (rng.spans, rng.unusable) == ((), "'10.0.0.0/29': every address is excluded")
    assert rng.reach == (ip("10.0.0.0"), ip("10.0.0.7"))  # where a DEL still finds its pods


@pytest.mark.parametrize(
    ("start", "end", "first", "last"),
    [
        ("10.0.0.50", "10.0.0.40", "10.0.0.50", "10.0.0.254"),  # an end before the start
        ("10.0.0.255", None, "10.0.0.1", "10.0.0.254"),  # a start on the broadcast address
        ("10.0.0.0", "10.0.0.9", "10.0.0.1", "10.0.0.9"),  # on the network address
        (None, "10.0.0.0", "10.0.0.1", "10.0.0.254"),  # an end on the network address
        ("10.0.1.7", "10.0.0.255", "10.0.0.1", "10.0.0.254"),  # outside the network
        ("2001:db8::5", "10.0.0.9", "10.0.0.1", "10.0.0.9"),  # of the other family
        ("10.0.0.9", "10.0.0.9", "10.0.0.9", "10.0.0.9"),  # one address
    ],
)
def test_a_bound_that_cannot_narrow_the_range_is_ignored_as_in_whereabouts(
    start: str | None, end: str | None, first: str, last: str
) -> None:
    # iphelpers.GetIPRange: range_start counts only within the usable addresses, range_end
    # only from the start on. A NAD that worked with whereabouts keeps its addresses.
    rng = make("10.0.0.0/24", start, end)
    assert (rng.first, rng.last, rng.unusable) == (ip(first), ip(last), "")


def test_bounds_of_the_start_end_form_follow_the_same_rule() -> None:
    rng = make("10.0.0.40-10.0.0.30/24")
    assert (rng.first, rng.last) == (ip("10.0.0.40"), ip("10.0.0.254"))


def test_an_exclusion_of_the_other_family_excludes_nothing_as_in_whereabouts() -> None:
    rng = make("10.0.0.0/24", exclude=["2001:db8::/64", "10.0.0.0/30"])
    assert rng.spans == ((ip("10.0.0.4"), ip("10.0.0.254")),) and rng.unusable == ""


def test_ipv6_uses_full_128_bit_arithmetic_including_the_upper_half_of_a_64() -> None:
    rng = make("2001:db8::/64", start="2001:db8::8000:0:0:0")
    assert rng.first == ip("2001:db8::8000:0:0:0")
    assert rng.last == ip("2001:db8::ffff:ffff:ffff:fffe")
    assert rng.size == 2**63 - 1
    assert rng.format(rng.last) == "2001:db8::ffff:ffff:ffff:fffe/64"


def test_a_wide_ipv6_range_has_its_size_without_enumeration() -> None:
    assert make("2001:db8::/32").size == 2**96 - 2


def test_can_give_checks_the_family() -> None:
    rng = make("10.0.0.0/24")
    assert rng.can_give(netaddr.IPAddress("10.0.0.5"))
    assert not rng.can_give(netaddr.IPAddress(ip("10.0.0.5"), 6))


@pytest.mark.parametrize("text", ["nonsense", "10.0.0.0/33", "", "1.2.3.4.5/24"])
def test_garbage_is_refused_with_the_value_named(text: str) -> None:
    with pytest.raises(RangeError) as excinfo:
        make(text)
    assert repr(text) in str(excinfo.value)


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32)), max_size=12),
)
def test_exclusions_leave_exactly_the_addresses_netaddrs_set_arithmetic_leaves(
    start: int, end: int, exclude: list[tuple[int, int]]
) -> None:
    cidrs = [f"10.0.0.{offset}/{prefix}" for offset, prefix in exclude]
    bounds = {"start": f"10.0.0.{start}", "end": f"10.0.0.{end}"}
    # Never the network or broadcast address; a bound that cannot narrow is ignored.
    first = start if 1 <= start <= 254 else 1
    last = end if first <= end <= 254 else 254
    usable = netaddr.IPSet()
    if first <= last:
        usable.add(netaddr.IPRange(f"10.0.0.{first}", f"10.0.0.{last}"))
    for cidr in cidrs:
        usable.remove(netaddr.IPNetwork(cidr).cidr)
    expected = tuple((int(r.first), int(r.last)) for r in usable.iter_ipranges())
    rng = make("10.0.0.0/24", exclude=cidrs, **bounds)
    assert rng.spans == expected
    assert bool(rng.unusable) == (not expected)


def test_thousands_of_exclusions_a_nads_writer_lists_are_taken_as_one_set() -> None:
    # Removed one by one from a netaddr IPSet, 5000 of them took a minute per parse (quadratic).
    excluded = [f"fd00::{n:x}/128" for n in range(2, 50_002, 2)]
    rng = make("fd00::/64", exclude=excluded)
    assert rng.spans[:2] == ((ip("fd00::1"), ip("fd00::1")), (ip("fd00::3"), ip("fd00::3")))
    assert len(rng.spans) == 25_001 and rng.size == (1 << 64) - 2 - 25_000


def test_octets_with_leading_zeros_are_decimal_as_whereabouts_reads_them() -> None:
    # Kubernetes' ParseIPSloppy (whereabouts' parser), never octal as inet_aton has it.
    rng = make("192.168.010.0/24", "192.168.010.010", "192.168.10.020", ["192.168.010.015"])
    assert rng.network == netaddr.IPNetwork("192.168.10.0/24")
    assert rng.spans == (
        (ip("192.168.10.10"), ip("192.168.10.14")),
        (ip("192.168.10.16"), ip("192.168.10.20")),
    )
    assert parse_address("010.000.000.001") == netaddr.IPAddress("10.0.0.1")


@pytest.mark.parametrize("text", ["192.168.1.0256", "1.2.3", "1.2.3.4.5", "0x10.0.0.1"])
def test_what_is_no_dotted_quad_even_read_sloppily_is_refused(text: str) -> None:
    with pytest.raises(RangeError):
        parse_address(text)
