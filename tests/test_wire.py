"""The byte-level query walk and reply scan, including the dnslib pitfalls kept as regression inputs."""

from __future__ import annotations

import struct

import dnslib
import pytest

import wire


def query_bytes(qname: str = "kubernetes.default.svc.cluster.local", qtype: str = "A", **kw) -> bytes:
    record = dnslib.DNSRecord.question(qname, qtype)
    record.header.id = kw.get("qid", 1234)
    if kw.get("edns"):
        record.add_ar(dnslib.EDNS0(udp_len=kw.get("payload", 4096), flags="do" if kw.get("do") else ""))
    if kw.get("cd"):
        record.header.cd = 1
    return bytes(record.pack())


class TestParseQuery:
    """parse_query: the hot path's single walk over a client query."""

    def test_plain_query(self):
        """A query without EDNS: question kept as asked, 512-byte limit, key folded to lower case."""
        query = wire.parse_query(query_bytes("KuBe.Cluster.Local"))
        assert query.question[:-4] == b"\x04KuBe\x07Cluster\x05Local\x00"
        assert query.key.startswith(b"\x04kube\x07cluster\x05local\x00")
        assert query.max_udp == 512 and not query.edns and query.qtype == 1

    def test_case_variants_share_a_key(self):
        """Names differing only in case map to one cache key (RFC 4343)."""
        assert wire.parse_query(query_bytes("A.B.C")).key == wire.parse_query(query_bytes("a.b.c")).key

    def test_qtype_bytes_are_not_case_folded(self):
        """qtype 65 (HTTPS, byte 'A') and qtype 97 (byte 'a') stay distinct keys."""
        assert wire.parse_query(query_bytes("x.y", "HTTPS")).key != wire.parse_query(query_bytes("x.y", "TYPE97")).key

    @pytest.mark.parametrize(("do", "cd"), [(False, False), (True, False), (False, True), (True, True)])
    def test_do_and_cd_are_part_of_the_key(self, do, cd):
        """DO and CD change what the upstream returns, so they are part of the key."""
        keys = {
            wire.parse_query(query_bytes(edns=True, do=d, cd=c)).key
            for d, c in [(False, False), (True, False), (False, True), (True, True)]
        }
        assert len(keys) == 4
        query = wire.parse_query(query_bytes(edns=True, do=do, cd=cd))
        assert (query.do, query.cd) == (do, cd)

    def test_edns_payload(self):
        """The client's EDNS payload size is its UDP limit; below 512 counts as 512."""
        assert wire.parse_query(query_bytes(edns=True, payload=1400)).max_udp == 1400
        assert wire.parse_query(query_bytes(edns=True, payload=100)).max_udp == 512

    def test_short_packet_dropped(self):
        """Fewer than 12 bytes: no header to answer with, dropped."""
        with pytest.raises(wire.DropQuery):
            wire.parse_query(b"\x00" * 11)

    def test_response_never_answered(self):
        """QR=1 packets are dropped, never answered (reflection loops, RFC 5452)."""
        packet = bytearray(query_bytes())
        packet[2] |= 0x80
        with pytest.raises(wire.DropQuery):
            wire.parse_query(bytes(packet))

    def test_other_opcodes_get_notimp(self):
        """An opcode other than QUERY gets NOTIMP."""
        packet = bytearray(query_bytes())
        packet[2] |= 2 << 3  # STATUS
        with pytest.raises(wire.BadQuery) as caught:
            wire.parse_query(bytes(packet))
        assert caught.value.rcode == wire.NOTIMP

    @pytest.mark.parametrize("qdcount", [0, 2])
    def test_qdcount_not_one_gets_formerr(self, qdcount):
        """QDCOUNT other than 1 gets FORMERR."""
        packet = bytearray(query_bytes())
        packet[4:6] = struct.pack("!H", qdcount)
        with pytest.raises(wire.BadQuery) as caught:
            wire.parse_query(bytes(packet))
        assert caught.value.rcode == wire.FORMERR

    def test_truncated_question_gets_formerr(self):
        """A question cut short gets FORMERR."""
        with pytest.raises(wire.BadQuery) as caught:
            wire.parse_query(query_bytes()[:20])
        assert caught.value.rcode == wire.FORMERR

    def test_two_opt_records_get_formerr(self):
        """More than one OPT is a format error (RFC 6891 §6.1.1)."""
        packet = bytearray(query_bytes(edns=True))
        opt = bytes(packet[-11:])
        packet[10:12] = struct.pack("!H", 2)
        with pytest.raises(wire.BadQuery) as caught:
            wire.parse_query(bytes(packet) + opt)
        assert caught.value.rcode == wire.FORMERR

    def test_edns_version_1_gets_badvers(self):
        """EDNS version other than 0 gets BADVERS with an OPT (RFC 6891 §6.1.3)."""
        packet = bytearray(query_bytes(edns=True))
        packet[-11 + 6] = 1  # version byte of the OPT TTL field
        with pytest.raises(wire.BadQuery) as caught:
            wire.parse_query(bytes(packet))
        assert caught.value.rcode == wire.BADVERS
        answer = dnslib.DNSRecord.parse(wire.error_response(bytes(packet), caught.value.rcode, caught.value.query))
        assert answer.ar[0].rtype == dnslib.QTYPE.OPT
        assert (answer.ar[0].ttl >> 24) == 1 and answer.header.rcode == 0


class TestScanReply:
    """scan_reply: bounds-checked walk of upstream replies."""

    def test_ttl_offsets_point_at_ttls(self):
        """Each noted offset holds that record's TTL."""
        reply = dnslib.DNSRecord.question("a.example").reply()
        reply.add_answer(dnslib.RR("a.example", rdata=dnslib.A("192.0.2.1"), ttl=123))
        reply.add_answer(dnslib.RR("a.example", rdata=dnslib.A("192.0.2.2"), ttl=456))
        packed = reply.pack()
        scan = wire.scan_reply(packed)
        assert [struct.unpack_from("!I", packed, o)[0] for o in scan.ttl_offsets] == [123, 456]

    def test_compression_loop_in_rdata_name_is_bounded(self):
        """name_to_text stops on a pointer loop instead of spinning."""
        packet = b"\x00" * 12 + b"\xc0\x0c"
        with pytest.raises(wire.WireError):
            wire.name_to_text(packet, 12)

    @pytest.mark.parametrize(
        "payload",
        [
            # dnslib 0.9.26 raises UnicodeDecodeError parsing a CAA value with non-UTF-8 bytes.
            bytes.fromhex("abcd81800001000100000000016103636f6d0001010001c00c01010001000000100007000574616761ff"),
            b"\xab\xcd\x81\x80\x00\x01\x00\x05\x00\x00\x00\x00\x00\x00\x01\x00\x01",
            b"\x00" * 12,
        ],
    )
    def test_bad_replies_raise_wire_error_only(self, payload):
        """Malformed replies raise WireError, never another exception type."""
        try:
            wire.scan_reply(payload)
        except wire.WireError:
            pass
