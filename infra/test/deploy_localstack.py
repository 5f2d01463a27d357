"""Deploys template.yaml (SAM transform applied) to LocalStack's CloudFormation and checks it.

    python infra/test/deploy_localstack.py          (AWS_ENDPOINT_URL: LocalStack)

LocalStack in host mode (no Docker) creates neither Lambda functions nor DynamoDB tables: both
download a runtime (a Lambda runtime, a JVM) when the first is created. So the stack is deployed
without the four functions, their event source mapping and event-invoke config, and the state
table; every reference to them becomes a placeholder name or ARN (the functions run through the
Lambda runtime API in the lane's tests, the table is on moto). Everything else is created and
checked: the bucket and its policy, the queues (the apply queue FIFO with its dead-letter
queue), the rule and its target, the state machine with the project's ASL and its role, the
schedule with its DLQ, the log groups, the alarms, the roles. Prints what was left out and why.
"""

import json
import os
import pathlib
import sys
import time
import uuid

import boto3

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sam_template  # noqa: E402

# Left out, with why (LocalStack without Docker cannot create them).
LEFT_OUT = {
    "AWS::Lambda::Function": "CreateFunction installs a Lambda runtime it downloads",
    "AWS::Lambda::EventSourceMapping": "needs the function",
    "AWS::Lambda::EventInvokeConfig": "needs the function",
    "AWS::DynamoDB::Table": "DynamoDB downloads a JVM (the lane keeps it on moto)",
}

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def placeholder(logical, res, attr=None):
    t = res["Type"]
    if t == "AWS::Lambda::Function":
        name = f"pgshift-placeholder-{logical}"
        arn = f"arn:aws:lambda:us-east-1:000000000000:function:{name}"
        return arn if attr == "Arn" else name
    if t == "AWS::DynamoDB::Table":
        return "arn:aws:dynamodb:us-east-1:000000000000:table/pgshift-state" if attr == "Arn" else "pgshift-state"
    return f"placeholder-{logical}"


def without(body, dropped):
    def sub(x):
        if isinstance(x, dict):
            if set(x) == {"Ref"} and x["Ref"] in dropped:
                return placeholder(x["Ref"], dropped[x["Ref"]])
            if set(x) == {"Fn::GetAtt"} and x["Fn::GetAtt"][0] in dropped:
                return placeholder(x["Fn::GetAtt"][0], dropped[x["Fn::GetAtt"][0]], x["Fn::GetAtt"][1])
            if set(x) == {"Fn::Sub"} and isinstance(x["Fn::Sub"], str):
                s = x["Fn::Sub"]
                for name, res in dropped.items():
                    s = s.replace("${" + name + ".Arn}", placeholder(name, res, "Arn"))
                    s = s.replace("${" + name + "}", placeholder(name, res))
                return {"Fn::Sub": s}
            out = {k: sub(v) for k, v in x.items()}
            if "DependsOn" in out:
                deps = [d for d in ([out["DependsOn"]] if isinstance(out["DependsOn"], str) else out["DependsOn"]) if d not in dropped]
                if deps:
                    out["DependsOn"] = deps
                else:
                    del out["DependsOn"]
            return out
        if isinstance(x, list):
            return [sub(v) for v in x]
        return x

    body = dict(body)
    body["Resources"] = {k: v for k, v in body["Resources"].items() if k not in dropped}
    return sub(body)


def main():
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        raise SystemExit("AWS_ENDPOINT_URL is not set: this deploys to LocalStack only")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    session = boto3.session.Session(region_name=os.environ["AWS_DEFAULT_REGION"])
    c = lambda svc: session.client(svc, endpoint_url=endpoint)  # noqa: E731
    suffix = uuid.uuid4().hex[:8]
    stack = f"pgshift-ls-{suffix}"
    secrets = c("secretsmanager")
    source = secrets.create_secret(Name=f"pgshift-ls-source-{suffix}", SecretString="{}")["ARN"]
    target = secrets.create_secret(Name=f"pgshift-ls-target-{suffix}", SecretString="{}")["ARN"]
    template = sam_template.yaml_parse(sam_template.ROOT.joinpath("template.yaml").read_text())
    body = sam_template.translate(sam_template.packaged(template, "pgshift-code-unused", "code"), {})
    dropped = {k: v for k, v in body["Resources"].items() if v["Type"] in LEFT_OUT}
    body = without(body, dropped)
    cfn = c("cloudformation")
    # As sam deploy does: the template from S3 (CloudFormation takes 51,200 bytes inline).
    templates = f"pgshift-ls-templates-{suffix}"
    c("s3").create_bucket(Bucket=templates)
    c("s3").put_object(Bucket=templates, Key="template.json", Body=json.dumps(body).encode())
    started = time.time()
    cfn.create_stack(
        StackName=stack,
        TemplateURL=f"{endpoint.rstrip('/')}/{templates}/template.json",
        Parameters=[
            {"ParameterKey": "SourceSecretArn", "ParameterValue": source},
            {"ParameterKey": "TargetSecretArn", "ParameterValue": target},
            {"ParameterKey": "TaskName", "ParameterValue": "orders-ls"},
            # LocalStack 4.9.2's ASL parser takes only STANDARD for a Distributed Map's child
            # workflows (AWS takes EXPRESS, the template's default; cfn-lint and the CDK
            # comparison check that one).
            {"ParameterKey": "ChunkWorkflowType", "ParameterValue": "STANDARD"},
        ],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    while True:
        desc = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        if not desc["StackStatus"].endswith("IN_PROGRESS") or time.time() - started > 120:
            break
        time.sleep(0.5)
    check(desc["StackStatus"] == "CREATE_COMPLETE",
          f"stack {stack} created in {time.time() - started:.1f} s ({desc['StackStatus']} {desc.get('StackStatusReason') or ''})")
    if failures:
        for e in cfn.describe_stack_events(StackName=stack)["StackEvents"]:
            if "FAILED" in e["ResourceStatus"]:
                print(f"     {e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')[:300]}")
        return stack, cfn
    created = {r["LogicalResourceId"]: r["ResourceStatus"]
               for r in cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]}
    # Their conditions are false with these parameters (no secret key, no VPC, poller disabled).
    conditional = {"SourceSecretKeyPolicy", "VpcAccessPolicy", "FunctionSecurityGroup", "EndpointSecurityGroup",
                   "S3GatewayEndpoint", "DynamoDbGatewayEndpoint", "SecretsManagerEndpoint", "EventsEndpoint",
                   "SqsEndpoint", "PollerStoppedAlarm", "DataKeyPolicy", "TracingPolicy"}
    for logical, res in body["Resources"].items():
        if logical in conditional:
            check(logical not in created, f"{logical} not created (its condition is false)")
        else:
            check(created.get(logical) == "CREATE_COMPLETE", f"stack has {logical} ({res['Type']})")
    out = {o["OutputKey"]: o["OutputValue"] for o in desc.get("Outputs", [])}
    sqs = c("sqs")
    attrs = sqs.get_queue_attributes(QueueUrl=out["ApplyQueueUrl"], AttributeNames=["All"])["Attributes"]
    check(attrs.get("FifoQueue") == "true" and "deadLetterTargetArn" in attrs.get("RedrivePolicy", ""),
          "the apply queue is FIFO with a dead-letter queue")
    sfn = c("stepfunctions")
    sm = sfn.describe_state_machine(stateMachineArn=out["FullLoadStateMachineArn"])
    asl = json.loads(sam_template.ROOT.joinpath("infra/statemachine/full-load.asl.json").read_text())
    check(json.loads(sm["definition"])["States"].keys() == asl["States"].keys(),
          "the state machine has the states of full-load.asl.json")
    rules = c("events").list_rules()["Rules"]
    check(any("Batch Committed" in (r.get("EventPattern") or "") and "orders-ls" in (r.get("EventPattern") or "")
              for r in rules), "the rule routes the task's Batch Committed events")
    left = ", ".join(f"{k} ({v['Type']})" for k, v in sorted(dropped.items()))
    print(f"n/a  left out on LocalStack without Docker: {left}")
    for t, why in LEFT_OUT.items():
        print(f"     {t}: {why}")
    return stack, cfn


if __name__ == "__main__":
    stack, cfn = main()
    try:
        cfn.delete_stack(StackName=stack)
    except Exception as e:  # noqa: BLE001 (the emulator is stopped next anyway)
        print(f"note: delete_stack: {e}")
    if failures:
        raise SystemExit(f"{len(failures)} LocalStack deployment check(s) failed: " + "; ".join(failures))
    print("template.yaml deployed to LocalStack; every check passed")
