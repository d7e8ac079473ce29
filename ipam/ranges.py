"""One configured address range: its bounds and the spans of addresses it may give out.

Addresses are plain ints (128-bit arithmetic for IPv6 comes free with Python ints), so the
allocator never walks the range address by address.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import netaddr

from pyabouts.ipam.pool import Family, PoolId


class RangeError(ValueError):
    """A range, bound or exclusion that cannot be used; the message names the value, and `key`
    the key of a range entry that holds it ("exclude[2]"), where that is not its `range`."""

    def __init__(self, message: str, key: str = "range") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class AddressRange:
    """A range as configured, reduced to the sorted, disjoint spans of usable addresses."""

    text: str  # the CIDR as configured, for messages
    network: netaddr.IPNetwork  # the normalized CIDR (host bits cleared)
    spans: tuple[tuple[int, int], ...]  # inclusive [first, last] pairs, ascending
    pool: PoolId
    # The inclusive [first, last] a transaction over the range reads: its whole network, so
    # that a DEL finds an address that bounds or exclusions added since took out of the range.
    reach: tuple[int, int]
    # Why the range gives nothing (no spans), else "". Such a range is refused for ADD, while
    # DEL and GC still free what its network holds: a config edited to drain a range (every
    # address excluded, say) must not leave its pods' DELs failing for ever.
    unusable: str = ""

    @property
    def family(self) -> Family:
        return self.pool.family

    @property
    def prefixlen(self) -> int:
        return int(self.network.prefixlen)

    @property
    def first(self) -> int:
        return self.spans[0][0]

    @property
    def last(self) -> int:
        return self.spans[-1][1]

    @property
    def size(self) -> int:
        """How many addresses this range can give out."""
        return sum(hi - lo + 1 for lo, hi in self.spans)

    def count_within(self, first: int, last: int) -> int:
        """How many addresses of [first, last] this range may give out."""
        return sum(max(0, min(hi, last) - max(lo, first) + 1) for lo, hi in self.spans)

    def in_network(self, address: int) -> bool:
        """True when `address` is in the range's CIDR, whether or not the range gives it (its
        bounds and exclusions, which a config may have narrowed since it was given)."""
        return int(self.network.first) <= address <= int(self.network.last)

    def contains(self, address: int) -> bool:
        """True when `address` is one this range may give out."""
        i = bisect.bisect_right(self.spans, (address, _MAX_ADDRESS)) - 1
        return i >= 0 and self.spans[i][0] <= address <= self.spans[i][1]

    def can_give(self, address: netaddr.IPAddress) -> bool:
        """True when `address` (of either family) is one this range may give out."""
        return int(address.version) == self.family and self.contains(int(address))

    def format(self, address: int) -> str:
        """The address in CIDR notation with this range's prefix length."""
        return f"{netaddr.IPAddress(address, self.family)}/{self.prefixlen}"


_MAX_ADDRESS = (1 << 128) - 1


def parse_address(text: str) -> netaddr.IPAddress:
    """An IP address, with an optional /prefix which is ignored."""
    try:
        return netaddr.IPAddress(_decimal_octets(text.split("/", 1)[0].strip()))
    except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
        raise RangeError(f"{text!r} is not an IP address") from exc


def parse_network(text: str) -> netaddr.IPNetwork:
    """A CIDR, host bits allowed; a bare address is its own /32 or /128."""
    try:
        address, slash, prefix = text.strip().partition("/")
        return netaddr.IPNetwork(_decimal_octets(address) + slash + prefix)
    except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
        raise RangeError(f"{text!r} is not a CIDR") from exc


_DOTTED_QUAD = re.compile(r"(\d+)\.(\d+)\.(\d+)\.(\d+)", re.ASCII)


def _decimal_octets(text: str) -> str:
    """An IPv4 address whose octets have leading zeros, as decimal ("192.168.010.1" is
    192.168.10.1), as whereabouts parses addresses (Kubernetes' ParseIPSloppy, what Go did
    before 1.17); anything else unchanged. netaddr refuses them, and inet_aton would read
    them as octal."""
    quad = _DOTTED_QUAD.fullmatch(text)
    if quad is None or not any(len(octet) > 1 and octet[0] == "0" for octet in quad.groups()):
        return text
    return ".".join(str(int(octet)) for octet in quad.groups())


def build_range(
    text: str,
    *,
    range_start: str | None,
    range_end: str | None,
    exclude: Sequence[str],
    pool: PoolId,
) -> AddressRange:
    """Parse `range` ("CIDR" or "START-END/PREFIX") with its bounds and exclusions."""
    return _parsed_range(text, range_start, range_end, tuple(exclude), pool)


# Kept: the node agent sees the same few ranges in every request, and parsing one with netaddr
# was a tenth of its CPU per ADD. A range is immutable; a bad one raises and is not kept.
@functools.lru_cache(maxsize=1024)
def _parsed_range(
    text: str,
    range_start: str | None,
    range_end: str | None,
    exclude: tuple[str, ...],
    pool: PoolId,
) -> AddressRange:
    start: netaddr.IPAddress | None
    end: netaddr.IPAddress | None
    if "-" in text:
        start_text, end_cidr = text.split("-", 1)
        network = parse_network(end_cidr)
        start, end = parse_address(start_text), network.ip
        if start not in network:
            raise RangeError(f"{text!r}: start {start} is outside {network.cidr}")
    else:
        network = parse_network(text)
        start = parse_address(range_start) if range_start else None
        end = parse_address(range_end) if range_end else None
    network = network.cidr
    reach = (int(network.first), int(network.last))

    def giving_nothing(why: str) -> AddressRange:
        return AddressRange(text, network, (), pool, reach, unusable=f"{text!r}: {why}")

    # The network and broadcast addresses are never given, for IPv6 too, so a /31, /32, /127 or
    # /128 has nothing to give.
    if network.size <= 2:
        return giving_nothing(f"a /{network.prefixlen} has no usable address")
    first, last = _bounded(network.first + 1, network.last - 1, start, end, network.version)

    excluded = []
    for index, item in enumerate(exclude):
        try:
            cidr = parse_network(item).cidr
        except RangeError as exc:
            raise RangeError(str(exc), key=f"exclude[{index}]") from None
        # One of the other family excludes nothing here, as in whereabouts (which only asks
        # whether an exclusion contains an address): a NAD ported from it keeps working.
        if cidr.version == network.version:
            excluded.append((int(cidr.first), int(cidr.last)))
    spans = _spans_left(first, last, excluded)
    if not spans:
        return giving_nothing("every address is excluded")
    return AddressRange(text=text, network=network, spans=spans, pool=pool, reach=reach)


def _bounded(
    first: int,
    last: int,
    start: netaddr.IPAddress | None,
    end: netaddr.IPAddress | None,
    version: int,
) -> tuple[int, int]:
    """The usable [first, last] narrowed by `start` and `end` where they can narrow it, as
    whereabouts does (iphelpers.GetIPRange): a start outside [first, last] is ignored, and so
    is an end outside [the start, last], one before the start included. A NAD that worked
    with whereabouts keeps its addresses; a bound of the other family is ignored too."""
    if start is not None and start.version == version and first <= int(start) <= last:
        first = int(start)
    if end is not None and end.version == version and first <= int(end) <= last:
        last = int(end)
    return first, last


def _spans_left(
    first: int, last: int, excluded: list[tuple[int, int]]
) -> tuple[tuple[int, int], ...]:
    """[first, last] without the `excluded` spans, as sorted disjoint spans. Sorted once: an
    exclude list is whatever a NAD's writer made it, and removing its entries from a netaddr
    IPSet one by one took a minute for 5000 of them (quadratic)."""
    spans: list[tuple[int, int]] = []
    cursor = first  # the lowest address not yet placed in or out
    for lo, hi in sorted(excluded):
        if lo > last:
            break
        if lo > cursor:
            spans.append((cursor, lo - 1))
        cursor = max(cursor, hi + 1)
    if cursor <= last:
        spans.append((cursor, last))
    return tuple(spans)
