"""The Python verifier in docs/signing.md checks the documented test vectors, and
answers every garbled input with False instead of an exception (an origin that
copies it must not answer 500 to a forged request)."""

import pathlib
import re
import time
import unittest
from unittest import mock

DOC = (pathlib.Path(__file__).parent.parent / "docs/signing.md").read_text(encoding="utf-8")


def doc_verifier():
    blocks = re.findall(r"```python\n(.*?)```", DOC, re.S)
    assert len(blocks) == 1, "docs/signing.md should hold one Python block"
    scope = {}
    exec(blocks[0], scope)  # noqa: S102 - our own documentation
    return scope["verify"]


def doc_vectors():
    secret = re.search(r"Secret: `(pfsig_[A-Za-z0-9_-]+)`, timestamp `(\d+)`", DOC)
    rows = re.findall(r"^\| `([A-Z]+)` \| `([^`]+)` \| `(sha256=[0-9a-f]{64})` \|$", DOC, re.M)
    assert secret and len(rows) == 2, "the test vectors in docs/signing.md changed shape"
    return secret.group(1), secret.group(2), rows


verify = doc_verifier()
SECRET, TS, VECTORS = doc_vectors()
_, GET_PATH, GET_SIG = VECTORS[0]


def at(now, *args):
    with mock.patch.object(time, "time", return_value=float(now)):
        return verify(*args)


class DocVerifierTest(unittest.TestCase):
    def test_accepts_the_documented_vectors(self):
        for method, path, sig in VECTORS:
            self.assertIs(bool(at(int(TS), SECRET, method, path, TS, sig)), True, (method, path))

    def test_replay_window(self):
        for skew, ok in [(300, True), (-300, True), (301, False), (-301, False)]:
            self.assertIs(bool(at(int(TS) + skew, SECRET, "GET", GET_PATH, TS, GET_SIG)), ok, skew)
        self.assertIs(bool(at(int(TS) + 1000, SECRET, "GET", GET_PATH, TS, GET_SIG, 1000)), True)

    def test_rejects_any_change(self):
        cases = [
            ("POST", GET_PATH, TS, GET_SIG),
            ("GET", GET_PATH.replace("OSL", "OSX"), TS, GET_SIG),
            ("GET", GET_PATH + "&x=1", TS, GET_SIG),
            ("GET", GET_PATH, str(int(TS) + 1), GET_SIG),
        ]
        for case in cases:
            self.assertIs(bool(at(int(TS), SECRET, *case)), False, case)
        self.assertIs(bool(at(int(TS), SECRET + "x", "GET", GET_PATH, TS, GET_SIG)), False)

    def test_rotation_any_of_the_signatures(self):
        other = "sha256=" + "0" * 64
        for header in [f"{GET_SIG},{other}", f"{other}, {GET_SIG}"]:
            self.assertIs(bool(at(int(TS), SECRET, "GET", GET_PATH, TS, header)), True, header)

    def test_garbled_input_is_false_never_an_exception(self):
        timestamps = [None, "", " ", "²", "١٧٠٠٠٠٠٠٠٠", "1e9", "-1", "+" + TS, TS + "\n",
                      "9" * 5000, "\x00", "\udcff"]
        signatures = [None, "", ",", "sha256=", "sha256=é" * 9, "sha256=" + "é" * 64,
                      "\udcff", GET_SIG.upper(), "sha1=" + GET_SIG[7:], GET_SIG + "\x00",
                      ",".join(["sha256=" + "0" * 64] * 4 + [GET_SIG]), "," * 100000]
        for ts in timestamps:
            for sig in [GET_SIG] + signatures:
                try:
                    ok = at(int(TS), SECRET, "GET", GET_PATH, ts, sig)
                except Exception as e:  # noqa: BLE001
                    self.fail(f"ts={ts[:20] if ts else ts!r} sig={sig[:20] if sig else sig!r}: {e!r}")
                self.assertIs(bool(ok), False, (ts and ts[:20], sig and sig[:20]))
        for sig in signatures:
            self.assertIs(bool(at(int(TS), SECRET, "GET", GET_PATH, TS, sig)), False, sig and sig[:20])


if __name__ == "__main__":
    unittest.main()
