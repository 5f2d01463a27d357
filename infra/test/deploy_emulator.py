"""Deploys template.yaml to the AWS emulator (AWS_ENDPOINT_URL) through CloudFormation and checks
that what a user relies on exists with the stated settings.

    python infra/test/deploy_emulator.py LAMBDA_DIR

LAMBDA_DIR holds `<binary>/bootstrap` from `cargo lambda build --release`; each is zipped and
uploaded as its function's code. The SAM transform runs here (as `sam deploy` would run it in
CloudFormation). Exits non-zero naming every check that failed. The emulator (moto) skips
AWS::Scheduler::Schedule; everything else is created.
"""

import io
import json
import os
import pathlib
import sys
import time
import uuid
import zipfile

import boto3
import botocore.exceptions

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sam_template  # noqa: E402

BINARIES = ["test-endpoint", "full-load", "cdc-poller", "apply"]
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def unless_unsupported(what, fn):
    """Runs a check of a setting the emulator may not apply from a template (moto leaves some
    out); such a gap is printed, not counted: cfn-lint and the CDK comparison cover the
    template itself."""
    try:
        fn()
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code.startswith("NoSuch") or code in ("NotImplemented", "ResourceNotFoundException"):
            print(f"n/a  {what} (the emulator does not apply it: {code})")
        else:
            raise


def main(lambda_dir):
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        raise SystemExit("AWS_ENDPOINT_URL is not set: this deploys to an emulator only")
    # moto keeps the state machines CloudFormation creates out of its executing Step Functions
    # backend, so this runs before ./scripts/test.sh turns execution on (moto's default is off).
    region = os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    session = boto3.session.Session(region_name=region)
    c = lambda svc: session.client(svc, endpoint_url=endpoint)  # noqa: E731
    s3, cfn = c("s3"), c("cloudformation")

    suffix = uuid.uuid4().hex[:8]
    # A long stack name (CloudFormation allows 128): no name the stack gives may overflow
    # (function names 64, state machine and queue names 80).
    stack = f"pgshift-ci-{suffix}-" + "a-stack-name-as-long-as-teams-make-them" * 2
    code_bucket = f"pgshift-code-{suffix}"
    s3.create_bucket(Bucket=code_bucket)
    for b in BINARIES:
        bootstrap = pathlib.Path(lambda_dir) / b / "bootstrap"
        if not bootstrap.is_file():
            raise SystemExit(f"{bootstrap} is missing: run ./scripts/package.sh")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            info = zipfile.ZipInfo("bootstrap")
            info.external_attr = 0o755 << 16
            z.writestr(info, bootstrap.read_bytes(), zipfile.ZIP_DEFLATED)
        s3.put_object(Bucket=code_bucket, Key=f"code/{b}.zip", Body=buf.getvalue())
    secret = c("secretsmanager").create_secret(
        Name=f"pgshift-ci-source-{suffix}",
        SecretString=json.dumps({"host": "127.0.0.1", "port": 5432, "username": "u", "password": "p", "dbname": "d"}),
    )["ARN"]

    target_secret = c("secretsmanager").create_secret(
        Name=f"pgshift-ci-target-{suffix}",
        SecretString=json.dumps({"host": "127.0.0.1", "port": 5433, "username": "u", "password": "p", "dbname": "t"}),
    )["ARN"]

    template = sam_template.yaml_parse(sam_template.ROOT.joinpath("template.yaml").read_text())
    body = sam_template.translate(sam_template.packaged(template, code_bucket, "code"), {})
    task = "orders-eu"
    cfn.create_stack(
        StackName=stack,
        TemplateBody=json.dumps(body, separators=(",", ":")),  # compact: CloudFormation takes 51,200 bytes inline
        Parameters=[
            {"ParameterKey": "SourceSecretArn", "ParameterValue": secret},
            {"ParameterKey": "TaskName", "ParameterValue": task},
            {"ParameterKey": "LogRetentionDays", "ParameterValue": "14"},
            {"ParameterKey": "StageFormat", "ParameterValue": "jsonl.gz"},
            {"ParameterKey": "TargetSecretArn", "ParameterValue": target_secret},
            {"ParameterKey": "PollerReservedConcurrency", "ParameterValue": "1"},
        ],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    deadline = time.time() + 120
    while True:
        desc = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        if not desc["StackStatus"].endswith("IN_PROGRESS") or time.time() > deadline:
            break
        time.sleep(0.5)
    check(desc["StackStatus"] == "CREATE_COMPLETE", f"stack {stack} created ({desc['StackStatus']}: {desc.get('StackStatusReason', '')})")
    if failures:
        return
    out = {o["OutputKey"]: o["OutputValue"] for o in desc.get("Outputs", [])}
    for key in ["StageBucketName", "StageUri", "StateTableName", "FullLoadStateMachineArn", "TestEndpointFunctionName",
                "FullLoadFunctionName", "CdcPollerFunctionName", "PollerDeadLetterQueueUrl", "SlotName",
                "ApplyFunctionName", "ApplyQueueUrl"]:
        check(bool(out.get(key)), f"output {key} = {out.get(key)}")
    check(out.get("SlotName") == "pgshift_orders_eu", "slot name follows the task name")
    check(out.get("StageUri") == f"s3://{out.get('StageBucketName')}/{task}", "stage URI is bucket/task")

    bucket = out["StageBucketName"]
    enc = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    check(enc["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256", "bucket encrypted")

    def public_access():
        pab = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        check(all(pab.values()) and len(pab) == 4, "bucket public access blocked")

    def lifecycle():
        rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        check(any(r.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation") == 2 for r in rules),
              "abandoned multipart uploads aborted after 2 days")

    def tls_only():
        policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
        check(any(s["Effect"] == "Deny" and "aws:SecureTransport" in json.dumps(s) for s in policy["Statement"]),
              "bucket denies plain HTTP")

    unless_unsupported("bucket public access block", public_access)
    unless_unsupported("bucket lifecycle rule", lifecycle)
    unless_unsupported("bucket policy", tls_only)

    ddb = c("dynamodb")
    table = ddb.describe_table(TableName=out["StateTableName"])["Table"]
    check(table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST", "state table on demand")
    check([k["AttributeName"] for k in table["KeySchema"]] == ["pk", "sk"], "state table keys pk/sk")

    lam, iam = c("lambda"), c("iam")
    # CloudFormation names the functions itself, within Lambda's 64 characters whatever the stack
    # name (moto does not shorten its generated names, so the template is checked, not moto).
    lambdas = [r for r in body["Resources"].values() if r["Type"] == "AWS::Lambda::Function"]
    check(len(lambdas) == 4 and all("FunctionName" not in r["Properties"] for r in lambdas),
          "no function name is derived from the stack name (CloudFormation's names fit 64 characters)")
    fn_outputs = {"test-endpoint": "TestEndpointFunctionName", "full-load": "FullLoadFunctionName",
                  "cdc-poller": "CdcPollerFunctionName", "apply": "ApplyFunctionName"}
    for b in BINARIES:
        name = out[fn_outputs[b]]
        fn = lam.get_function(FunctionName=name)
        conf = fn["Configuration"]
        check(conf["Runtime"] == "provided.al2023" and conf["Handler"] == "bootstrap", f"{name}: provided.al2023 bootstrap")
        env = conf["Environment"]["Variables"]
        check(env["PGSHIFT_TASK"] == task and env["PGSHIFT_STAGE"] == out["StageUri"]
              and env["PGSHIFT_STATE_TABLE"] == out["StateTableName"] and env["PGSHIFT_SOURCE_SECRET_ARN"] == secret
              and env["PGSHIFT_FORMAT"] == "jsonl.gz" and env["PGSHIFT_CDC"] == "true"
              and env["PGSHIFT_COMMIT_TS_COLUMN"] == "false" and env["PGSHIFT_SOURCE_SSLMODE"] == "auto",
              f"{name}: environment wired to the stack")
        check((env.get("PGSHIFT_S3_PART_MB") == "64") == (b == "full-load"),
              f"{name}: only the full load stages in 64 MiB parts (PGSHIFT_S3_PART_MB)")
        role = conf["Role"].rsplit("/", 1)[1]
        names = iam.list_role_policies(RoleName=role)["PolicyNames"]
        docs = [iam.get_role_policy(RoleName=role, PolicyName=n)["PolicyDocument"] for n in names]
        text = json.dumps(docs)
        if b == "apply":
            check(target_secret in text and secret not in text, f"{name}: may read the target secret, not the source's")
        else:
            check(secret in text, f"{name}: may read the source secret")
        check(iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == [], f"{name}: no managed policies")
        check("ec2:CreateNetworkInterface" not in text, f"{name}: no VPC permissions outside a VPC")
        check(("s3:PutObject" in text) == (b not in ("test-endpoint", "apply")),
              f"{name}: S3 writes only for the functions that stage")
    concurrency = lam.get_function_concurrency(FunctionName=out["CdcPollerFunctionName"]).get("ReservedConcurrentExecutions")
    check(concurrency == 1, f"poller reserved concurrency 1 when asked ({concurrency})")

    sfn = c("stepfunctions")
    sm = sfn.describe_state_machine(stateMachineArn=out["FullLoadStateMachineArn"])
    definition = json.loads(sm["definition"])
    asl = json.loads(sam_template.ROOT.joinpath("infra/statemachine/full-load.asl.json").read_text())
    check(definition["States"].keys() == asl["States"].keys(), "state machine has the states of full-load.asl.json")
    check("FullLoadStateMachineRole" in sm["roleArn"], "state machine runs with its own role")
    check(sm["name"].startswith(f"pgshift-{task}-") and len(sm["name"]) <= 80,
          f"state machine name {sm['name']!r} bounded whatever the stack name")
    for url in (out["ApplyQueueUrl"],):
        qname = url.rsplit("/", 1)[1]
        check(qname.endswith(".fifo") and len(qname) <= 80, f"queue name {qname!r} within 80 characters")

    sqs = c("sqs")
    attrs = sqs.get_queue_attributes(QueueUrl=out["PollerDeadLetterQueueUrl"], AttributeNames=["All"])["Attributes"]
    check(attrs.get("MessageRetentionPeriod") == "1209600", "dead-letter queue keeps failures 14 days")
    attrs = sqs.get_queue_attributes(QueueUrl=out["ApplyQueueUrl"], AttributeNames=["All"])["Attributes"]
    check(attrs.get("FifoQueue") == "true", "the apply queue is FIFO")
    check("deadLetterTargetArn" in attrs.get("RedrivePolicy", ""), "the apply queue has a dead-letter queue")
    rules = c("events").list_rules(NamePrefix=stack)["Rules"] + c("events").list_rules()["Rules"]
    check(any("Batch Committed" in (r.get("EventPattern") or "") for r in rules), "a rule routes Batch Committed to the apply queue")

    # Every resource of the template exists, except the types moto 5.2.5 skips without a word
    # (cfn-lint and the CDK comparison cover those); it also ignores Architectures, point-in-time
    # recovery and DefinitionSubstitutions, so those are not checked here either.
    created = {r["LogicalResourceId"] for r in cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]}
    skipped_types = {"AWS::CloudWatch::Alarm", "AWS::Lambda::EventInvokeConfig", "AWS::S3::BucketPolicy",
                     "AWS::Scheduler::Schedule", "AWS::SQS::QueuePolicy"}
    conditional = {"SourceSecretKeyPolicy", "VpcAccessPolicy", "FunctionSecurityGroup", "EndpointSecurityGroup",
                   "S3GatewayEndpoint", "DynamoDbGatewayEndpoint", "SecretsManagerEndpoint", "EventsEndpoint",
                   "SqsEndpoint", "PollerStoppedAlarm", "DataKeyPolicy", "TracingPolicy"}
    skipped = []
    for logical, res in body["Resources"].items():
        if logical in conditional:
            check(logical not in created, f"{logical} not created (its condition is false)")
        elif res["Type"] in skipped_types:
            skipped.append(logical)
        else:
            check(logical in created, f"stack has {logical} ({res['Type']})")
    print(f"n/a  skipped by the emulator: {', '.join(sorted(skipped))}")

    cfn.delete_stack(StackName=stack)
    options_stack(c, body, secret, suffix)


def options_stack(c, body, secret, suffix):
    """The optional parameters deployed: a customer-managed KMS key, versioned staging, X-Ray,
    and the functions in a VPC with the endpoints the stack creates."""
    cfn, ec2 = c("cloudformation"), c("ec2")
    key = c("kms").create_key(Description="pgshift-ci data key")["KeyMetadata"]["Arn"]
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=f"pgshift-ci-{suffix}", Description="fn", VpcId=vpc)["GroupId"]
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    stack = f"pgshift-opt-{suffix}"
    cfn.create_stack(
        StackName=stack,
        TemplateBody=json.dumps(body, separators=(",", ":")),  # compact: CloudFormation takes 51,200 bytes inline
        Parameters=[
            {"ParameterKey": "SourceSecretArn", "ParameterValue": secret},
            {"ParameterKey": "TaskName", "ParameterValue": "opts"},
            {"ParameterKey": "DataKmsKeyArn", "ParameterValue": key},
            {"ParameterKey": "StageBucketVersioning", "ParameterValue": "true"},
            {"ParameterKey": "Tracing", "ParameterValue": "Active"},
            {"ParameterKey": "SubnetIds", "ParameterValue": subnet},
            {"ParameterKey": "SecurityGroupIds", "ParameterValue": group},
            {"ParameterKey": "VpcEndpoints", "ParameterValue": "create"},
            {"ParameterKey": "VpcId", "ParameterValue": vpc},
            {"ParameterKey": "RouteTableIds", "ParameterValue": table},
        ],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    deadline = time.time() + 120
    while True:
        desc = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        if not desc["StackStatus"].endswith("IN_PROGRESS") or time.time() > deadline:
            break
        time.sleep(0.5)
    check(desc["StackStatus"] == "CREATE_COMPLETE",
          f"options stack created ({desc['StackStatus']}: {desc.get('StackStatusReason', '')})")
    if desc["StackStatus"] != "CREATE_COMPLETE":
        return
    out = {o["OutputKey"]: o["OutputValue"] for o in desc.get("Outputs", [])}
    created = {r["LogicalResourceId"] for r in cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]}
    for logical in ["DataKeyPolicy", "TracingPolicy", "VpcAccessPolicy", "FunctionSecurityGroup", "EndpointSecurityGroup",
                    "S3GatewayEndpoint", "DynamoDbGatewayEndpoint", "SecretsManagerEndpoint", "EventsEndpoint"]:
        check(logical in created, f"options stack has {logical}")
    s3 = c("s3")
    enc = s3.get_bucket_encryption(Bucket=out["StageBucketName"])["ServerSideEncryptionConfiguration"]["Rules"][0]
    by_default = enc["ApplyServerSideEncryptionByDefault"]
    check(by_default["SSEAlgorithm"] == "aws:kms" and by_default.get("KMSMasterKeyID") == key, "staged data under the data key")
    # moto 5.2.5 leaves these three out of what it creates from a template (what it reports
    # instead is printed; cfn-lint and the CDK comparison cover the template).
    versioning = s3.get_bucket_versioning(Bucket=out["StageBucketName"]).get("Status")
    sse = c("dynamodb").describe_table(TableName=out["StateTableName"])["Table"].get("SSEDescription", {})
    conf = c("lambda").get_function(FunctionName=out["CdcPollerFunctionName"])["Configuration"]
    tracing = conf.get("TracingConfig", {}).get("Mode")
    for what, got, want in [("staging versioned", versioning, "Enabled"),
                            ("state table under the data key", sse.get("KMSMasterKeyArn"), key),
                            ("functions traced with X-Ray", tracing, "Active")]:
        if got == want:
            check(True, what)
        else:
            print(f"n/a  {what} (the emulator does not apply it: {got!r})")
    groups = conf.get("VpcConfig", {}).get("SecurityGroupIds", [])
    check(group in groups and len(groups) == 2, f"functions in the user's group and the stack's ({groups})")
    cfn.delete_stack(StackName=stack)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
    if failures:
        raise SystemExit(f"{len(failures)} deployment check(s) failed: " + "; ".join(failures))
    print("template.yaml deployed to the emulator; every check passed")
