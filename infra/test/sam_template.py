"""template.yaml as plain CloudFormation, for the emulator deploy and the CDK comparison.

    python infra/test/sam_template.py translate OUT.json [--code-bucket B --code-prefix P]

The SAM transform (aws-sam-translator, the library behind `sam deploy`) needs the functions'
code in S3 and the state machine definition inline, as `sam package` would leave them: local
`CodeUri` become `s3://B/P/<binary>.zip` (placeholders when no bucket is given) and
`DefinitionUri` becomes the JSON of `infra/statemachine/full-load.asl.json`.
"""

import argparse
import copy
import json
import os
import pathlib
import sys

from samtranslator.model.exceptions import InvalidDocumentException
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

ROOT = pathlib.Path(__file__).resolve().parents[2]


class NoManagedPolicies:
    """The template names no managed policy by name; SAM's own are resolved by ARN."""

    def load(self):
        return {}


def packaged(template, code_bucket, code_prefix):
    """The template as `sam package` leaves it: code in S3, state machine definition inline."""
    t = copy.deepcopy(template)
    t.get("Globals", {}).get("Function", {}).pop("CodeUri", None)
    for name, res in t["Resources"].items():
        if res["Type"] == "AWS::Serverless::Function":
            binary = res.get("Metadata", {}).get("BuildProperties", {}).get("Binary")
            if not binary:
                raise SystemExit(f"{name}: Metadata.BuildProperties.Binary is missing")
            key = f"{code_prefix}/{binary}.zip" if code_prefix else f"{binary}.zip"
            res["Properties"]["CodeUri"] = {"Bucket": code_bucket, "Key": key}
        elif res["Type"] == "AWS::Serverless::StateMachine":
            uri = res["Properties"].pop("DefinitionUri")
            res["Properties"]["Definition"] = json.loads((ROOT / uri).read_text())
    return t


def translate(template, parameters):
    # The transform resolves the partition from a region; any commercial region gives `aws`.
    # Set but empty counts as unset (boto3 finds no region either way).
    if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
        os.environ.pop("AWS_REGION", None)
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    try:
        return transform(template, parameters, NoManagedPolicies())
    except InvalidDocumentException as e:
        msgs = "; ".join(str(c) for c in e.causes)
        raise SystemExit(f"template.yaml: SAM transform failed: {msgs}") from None


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["translate"])
    p.add_argument("out")
    p.add_argument("--template", default=str(ROOT / "template.yaml"))
    p.add_argument("--code-bucket", default="pgshift-code-placeholder")
    p.add_argument("--code-prefix", default="")
    args = p.parse_args(argv)
    template = yaml_parse(pathlib.Path(args.template).read_text())
    cfn = translate(packaged(template, args.code_bucket, args.code_prefix), {})
    pathlib.Path(args.out).write_text(json.dumps(cfn, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
