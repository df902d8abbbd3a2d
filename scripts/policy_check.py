"""Policy gates for template.yaml; a violation fails the build.

Checks: every DynamoDB table encrypted, with point-in-time recovery and deletion
protection; every function arm64 with a log group of bounded retention; CloudFront
HTTPS-only with TLS >= 1.2 to viewers and origins; no IAM `Resource: "*"` on data
actions; every alarm sends somewhere; every alarm has a runbook and every alarm a
runbook names exists; the dashboard function may make every DynamoDB item call the
store's code makes (it serves every kind of change).

Usage: python3 scripts/policy_check.py [template.yaml] [runbooks/] [dynamo.rs]
"""

import pathlib
import re
import sys

from cfnlint.decode import cfn_yaml

DATA_ACTIONS = ("dynamodb:", "secretsmanager:", "s3:", "kms:", "sqs:", "sns:")
TLS_OK = {"TLSv1.2_2018", "TLSv1.2_2019", "TLSv1.2_2021", "TLSv1.2_2025", "TLSv1.3_2025"}
ALARM_REF = re.compile(r"<stack>-([a-z0-9-]+)")
# SDK calls on items and queries (not table administration) -> their IAM actions.
STORE_CALLS = {
    "get_item": "dynamodb:GetItem",
    "put_item": "dynamodb:PutItem",
    "update_item": "dynamodb:UpdateItem",
    "delete_item": "dynamodb:DeleteItem",
    "batch_write_item": "dynamodb:BatchWriteItem",
    "batch_get_item": "dynamodb:BatchGetItem",
    "query": "dynamodb:Query",
    "scan": "dynamodb:Scan",
}
STORE_CALL = re.compile(r"\.(" + "|".join(STORE_CALLS) + r")\(\)")


def store_actions(source):
    """The IAM actions of the DynamoDB calls made in the store's source."""
    return {STORE_CALLS[m] for m in STORE_CALL.findall(source)}


def alarm_suffix(name):
    """`!Sub "${AWS::StackName}-proxy-errors"` -> "proxy-errors"."""
    if isinstance(name, dict) and "Fn::Sub" in name:
        name = name["Fn::Sub"]
    if isinstance(name, str) and name.startswith("${AWS::StackName}-"):
        return name[len("${AWS::StackName}-"):]
    return None


def statements(policies):
    for p in policies or []:
        if isinstance(p, dict):
            doc = p.get("PolicyDocument", p)
            st = doc.get("Statement", [])
            yield from (st if isinstance(st, list) else [st])


def star_on_data(name, stmts):
    """Violations: statements granting data actions on `Resource: "*"`."""
    found = []
    for st in stmts:
        actions = st.get("Action", [])
        actions = actions if isinstance(actions, list) else [actions]
        resources = st.get("Resource", [])
        resources = resources if isinstance(resources, list) else [resources]
        if "*" in resources and any(str(a).startswith(DATA_ACTIONS) or a == "*" for a in actions):
            found.append(f"{name}: IAM Resource \"*\" on data actions {actions}")
    return found


def check(template, runbooks, store_source=""):
    """Return a list of violations (empty when the template complies)."""
    errors = []
    res = template.get("Resources", {})
    glob = template.get("Globals", {}).get("Function", {})
    by_type = lambda t: {k: v for k, v in res.items() if v.get("Type") == t}

    for name, r in by_type("AWS::DynamoDB::Table").items():
        p = r.get("Properties", {})
        if not p.get("SSESpecification", {}).get("SSEEnabled"):
            errors.append(f"{name}: table not encrypted (SSESpecification.SSEEnabled)")
        if not p.get("PointInTimeRecoverySpecification", {}).get("PointInTimeRecoveryEnabled"):
            errors.append(f"{name}: table without point-in-time recovery")
        if not p.get("DeletionProtectionEnabled"):
            errors.append(f"{name}: table without deletion protection")
        if r.get("DeletionPolicy") != "Retain":
            errors.append(f"{name}: table not retained on stack deletion")

    groups = by_type("AWS::Logs::LogGroup")
    for name, r in groups.items():
        if not r.get("Properties", {}).get("RetentionInDays"):
            errors.append(f"{name}: log group without retention")
    for name, r in by_type("AWS::Serverless::Function").items():
        p = r.get("Properties", {})
        arch = p.get("Architectures", glob.get("Architectures"))
        if arch != ["arm64"]:
            errors.append(f"{name}: function is not arm64 ({arch})")
        group = p.get("LoggingConfig", {}).get("LogGroup", {})
        ref = group.get("Ref") if isinstance(group, dict) else None
        if ref not in groups:
            errors.append(f"{name}: function does not log to a log group of this template with retention")
        errors += star_on_data(name, statements(p.get("Policies")))
    dashboard = res.get("DashboardFunction", {}).get("Properties", {})
    granted = set()
    for st in statements(dashboard.get("Policies")):
        actions = st.get("Action", [])
        granted.update(actions if isinstance(actions, list) else [actions])
    for action in sorted(store_actions(store_source) - granted):
        errors.append(f"DashboardFunction: the store calls {action}, which its policy lacks")
    for name, r in {**by_type("AWS::IAM::Role"), **by_type("AWS::IAM::Policy")}.items():
        p = r.get("Properties", {})
        errors += star_on_data(name, list(statements(p.get("Policies"))) + list(statements([p])))

    for name, r in by_type("AWS::CloudFront::Distribution").items():
        cfg = r.get("Properties", {}).get("DistributionConfig", {})
        tls = cfg.get("ViewerCertificate", {}).get("MinimumProtocolVersion")
        if tls not in TLS_OK:
            errors.append(f"{name}: viewer TLS minimum {tls!r} is below TLS 1.2")
        for b in [cfg.get("DefaultCacheBehavior", {})] + cfg.get("CacheBehaviors", []):
            if b.get("ViewerProtocolPolicy") not in ("redirect-to-https", "https-only"):
                errors.append(f"{name}: behavior {b.get('PathPattern', 'default')} allows plain HTTP")
        for o in cfg.get("Origins", []):
            c = o.get("CustomOriginConfig")
            if c and (c.get("OriginProtocolPolicy") != "https-only" or set(c.get("OriginSSLProtocols", [])) - {"TLSv1.2"}):
                errors.append(f"{name}: origin {o.get('Id')} not HTTPS with TLS 1.2")

    alarms = {}
    for name, r in by_type("AWS::CloudWatch::Alarm").items():
        p = r.get("Properties", {})
        if not p.get("AlarmActions"):
            errors.append(f"{name}: alarm without an action")
        suffix = alarm_suffix(p.get("AlarmName"))
        if suffix is None:
            errors.append(f"{name}: alarm name must be \"${{AWS::StackName}}-<name>\"")
        else:
            alarms[suffix] = name
    named = {}
    for book, text in runbooks.items():
        for suffix in ALARM_REF.findall(text):
            named.setdefault(suffix, set()).add(book)
            if suffix not in alarms:
                errors.append(f"runbooks/{book}: names alarm <stack>-{suffix}, which the template lacks")
    for suffix, name in alarms.items():
        if suffix not in named:
            errors.append(f"{name}: alarm <stack>-{suffix} has no runbook")
    return errors


def load(template_path="template.yaml", runbook_dir="runbooks", store="shared/src/store/dynamo.rs"):
    template = cfn_yaml.load(template_path)
    runbooks = {p.name: p.read_text() for p in sorted(pathlib.Path(runbook_dir).glob("*.md"))}
    return template, runbooks, pathlib.Path(store).read_text()


if __name__ == "__main__":
    template, runbooks, store_source = load(*sys.argv[1:4])
    problems = check(template, runbooks, store_source)
    alarms = sum(1 for r in template["Resources"].values() if r.get("Type") == "AWS::CloudWatch::Alarm")
    for p in problems:
        print(f"POLICY VIOLATION: {p}")
    print(f"policy check: {alarms} alarms, {len(runbooks)} runbooks, {len(problems)} violations")
    sys.exit(1 if problems else 0)
