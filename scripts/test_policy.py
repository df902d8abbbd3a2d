"""The policy check passes on template.yaml and catches each kind of violation."""

import copy
import pathlib
import sys
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import policy_check  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent
TEMPLATE, RUNBOOKS, STORE = policy_check.load(
    ROOT / "template.yaml", ROOT / "runbooks", ROOT / "shared/src/store/dynamo.rs"
)


def violations(mutate=None, runbooks=None):
    t = copy.deepcopy(TEMPLATE)
    if mutate:
        mutate(t["Resources"], t)
    return policy_check.check(t, runbooks if runbooks is not None else RUNBOOKS, STORE)


class PolicyTest(unittest.TestCase):
    def test_template_complies(self):
        self.assertEqual(violations(), [])
        alarms = [r for r in TEMPLATE["Resources"].values() if r["Type"] == "AWS::CloudWatch::Alarm"]
        self.assertEqual(len(alarms), 14)

    def test_catches_violations(self):
        cases = {
            "not encrypted": lambda r, t: r["Table"]["Properties"].pop("SSESpecification"),
            "point-in-time": lambda r, t: r["Table"]["Properties"].pop("PointInTimeRecoverySpecification"),
            "not arm64": lambda r, t: r["ProxyFunction"]["Properties"].__setitem__("Architectures", ["x86_64"]),
            "retention": lambda r, t: r["ProxyLogGroup"]["Properties"].pop("RetentionInDays"),
            "below TLS 1.2": lambda r, t: r["Distribution"]["Properties"]["DistributionConfig"]["ViewerCertificate"].__setitem__("MinimumProtocolVersion", "TLSv1"),
            "plain HTTP": lambda r, t: r["Distribution"]["Properties"]["DistributionConfig"]["DefaultCacheBehavior"].__setitem__("ViewerProtocolPolicy", "allow-all"),
            'Resource "*"': lambda r, t: r["AuthorizeFunction"]["Properties"]["Policies"][0]["Statement"][0].__setitem__("Resource", "*"),
            "without an action": lambda r, t: r["ProxyErrorsAlarm"]["Properties"].pop("AlarmActions"),
            "the store calls dynamodb:DeleteItem": lambda r, t: r["DashboardFunction"]["Properties"]["Policies"][0]["Statement"][0]["Action"].remove("dynamodb:DeleteItem"),
            "has no runbook": lambda r, t: r["ProxyErrorsAlarm"]["Properties"].__setitem__("AlarmName", {"Fn::Sub": "${AWS::StackName}-brand-new"}),
        }
        for expected, mutate in cases.items():
            found = violations(mutate)
            self.assertTrue(any(expected in v for v in found), f"{expected}: {found}")

    def test_store_calls_are_found(self):
        self.assertEqual(
            policy_check.store_actions(STORE),
            {"dynamodb:" + a for a in ["GetItem", "PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "BatchGetItem", "Query"]},
        )

    def test_runbook_naming_a_missing_alarm(self):
        books = dict(RUNBOOKS)
        books["extra.md"] = "Detection: alarm `<stack>-no-such-alarm`."
        self.assertTrue(any("no-such-alarm" in v for v in violations(runbooks=books)))


if __name__ == "__main__":
    unittest.main()
