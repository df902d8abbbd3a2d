"""The verifiers in docs/signing.md (Python, and Node.js run with `node`) check the
documented test vectors, and answer every garbled input with False instead of an
exception (an origin that copies one must not answer 500 to a forged request)."""

import json
import pathlib
import re
import shutil
import subprocess
import time
import unittest
from unittest import mock

DOC = (pathlib.Path(__file__).parent.parent / "docs/signing.md").read_text(encoding="utf-8")


def doc_block(lang):
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)
    assert blocks, f"docs/signing.md should hold a {lang} block"
    return blocks[0]


def doc_vectors():
    secret = re.search(r"Secret: `(pfsig_[A-Za-z0-9_-]+)`, timestamp `(\d+)`", DOC)
    rows = re.findall(r"^\| `([A-Z]+)` \| `([^`]+)` \| `(sha256=[0-9a-f]{64})` \|$", DOC, re.M)
    assert secret and len(rows) == 2, "the test vectors in docs/signing.md changed shape"
    return secret.group(1), secret.group(2), rows


SECRET, TS, VECTORS = doc_vectors()
_, GET_PATH, GET_SIG = VECTORS[0]
NOW = int(TS)


def cases():
    """Every check, as (what, now, (secret, method, path, ts, sig[, window]), expected)."""
    out = [(f"vector {m} {p}", NOW, (SECRET, m, p, TS, sig), True) for m, p, sig in VECTORS]
    for skew, ok in [(300, True), (-300, True), (301, False), (-301, False)]:
        out.append((f"skew {skew}", NOW + skew, (SECRET, "GET", GET_PATH, TS, GET_SIG), ok))
    out.append(("window 1000", NOW + 1000, (SECRET, "GET", GET_PATH, TS, GET_SIG, 1000), True))
    for what, args in [
        ("method", (SECRET, "POST", GET_PATH, TS, GET_SIG)),
        ("path", (SECRET, "GET", GET_PATH.replace("OSL", "OSX"), TS, GET_SIG)),
        ("query", (SECRET, "GET", GET_PATH + "&x=1", TS, GET_SIG)),
        ("timestamp", (SECRET, "GET", GET_PATH, str(NOW + 1), GET_SIG)),
        ("secret", (SECRET + "x", "GET", GET_PATH, TS, GET_SIG)),
    ]:
        out.append((f"changed {what}", NOW, args, False))
    other = "sha256=" + "0" * 64
    for header in [f"{GET_SIG},{other}", f"{other}, {GET_SIG}"]:
        out.append((f"rotation {header[:20]}", NOW, (SECRET, "GET", GET_PATH, TS, header), True))
    timestamps = [None, "", " ", "²", "١٧٠٠٠٠٠٠٠٠", "1e9", "-1", "+" + TS, TS + "\n",
                  "9" * 5000, "\x00", "\udcff"]
    signatures = [None, "", ",", "sha256=", "sha256=é" * 9, "sha256=" + "é" * 64,
                  "\udcff", GET_SIG.upper(), "sha1=" + GET_SIG[7:], GET_SIG + "\x00",
                  ",".join(["sha256=" + "0" * 64] * 4 + [GET_SIG]), "," * 100000]
    for ts in timestamps:
        for sig in [GET_SIG] + signatures:
            what = f"garbled ts={ts[:20] if ts else ts!r} sig={sig[:20] if sig else sig!r}"
            out.append((what, NOW, (SECRET, "GET", GET_PATH, ts, sig), False))
    for sig in signatures:
        out.append((f"garbled sig={sig[:20] if sig else sig!r}", NOW, (SECRET, "GET", GET_PATH, TS, sig), False))
    return out


class PythonVerifierTest(unittest.TestCase):
    def test_documented_cases(self):
        scope = {}
        exec(doc_block("python"), scope)  # noqa: S102 - our own documentation
        verify = scope["verify"]
        for what, now, args, expected in cases():
            with self.subTest(what):
                with mock.patch.object(time, "time", return_value=float(now)):
                    try:
                        got = verify(*args)
                    except Exception as e:  # noqa: BLE001
                        self.fail(f"raised {e!r}")
                self.assertIs(bool(got), expected)


# The first block, then: read the cases from stdin, answer each with its result or
# what it threw. A window left out (null) takes the function's default.
NODE_HARNESS = """
const cases = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(cases.map(([now, [secret, method, path, ts, sig, win]]) => {
  try {
    return verify(secret, method, path, ts, sig, win ?? undefined, now);
  } catch (e) {
    return "threw " + e;
  }
})));
"""


@unittest.skipUnless(shutil.which("node"), "node is not installed")
class NodeVerifierTest(unittest.TestCase):
    def test_documented_cases(self):
        all_cases = cases()
        run = subprocess.run(
            ["node", "-e", doc_block("js") + NODE_HARNESS],
            input=json.dumps([[now, list(args)] for _, now, args, _ in all_cases]),
            capture_output=True, text=True, check=True, timeout=60,
        )
        results = json.loads(run.stdout)
        self.assertEqual(len(results), len(all_cases))
        for (what, _, _, expected), got in zip(all_cases, results):
            with self.subTest(what):
                self.assertIs(got, expected)


if __name__ == "__main__":
    unittest.main()
