// The CDK app synthesizes the same stack as template.yaml: after the SAM transform of the one and
// synthesis of the other, parameters, conditions, outputs and every resource with its properties
// (IAM policies included) are equal; only what each tool adds about itself differs (asset
// locations of the code, SAM's createdBy tags, CDK's metadata). PGSHIFT_SAM_TEMPLATE_JSON names
// the translated template (`python infra/test/sam_template.py translate OUT.json`;
// ./scripts/test.sh does both).
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { App, DefaultStackSynthesizer } from 'aws-cdk-lib';
import { PgshiftStack } from '../lib/pgshift-stack';

type Json = any; // eslint-disable-line @typescript-eslint/no-explicit-any

function synthesized(): Json {
  const outdir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgshift-cdk-'));
  try {
    // No bundling here: `cargo lambda build` runs at deploy time, not in this comparison.
    const app = new App({ outdir, context: { 'aws:cdk:bundling-stacks': [] } });
    const stack = new PgshiftStack(app, 'Pgshift', {
      stackName: 'pgshift',
      synthesizer: new DefaultStackSynthesizer({ generateBootstrapVersionRule: false }),
    });
    const assembly = app.synth();
    return assembly.getStackArtifact(stack.artifactId).template;
  } finally {
    fs.rmSync(outdir, { recursive: true, force: true });
  }
}

function samTemplate(): Json {
  const file = process.env.PGSHIFT_SAM_TEMPLATE_JSON;
  if (!file) {
    throw new Error('PGSHIFT_SAM_TEMPLATE_JSON is not set: run ./scripts/test.sh, or translate template.yaml first');
  }
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

const TOOL_TAGS = new Set(['lambda:createdBy', 'stateMachine:createdBy']);

/** A state machine definition as data, whether a string or SAM's Fn::Join of lines. */
function definition(value: Json): Json {
  if (typeof value === 'string') return JSON.parse(value);
  if (value && value['Fn::Join']) {
    const [sep, parts] = value['Fn::Join'];
    return JSON.parse(parts.join(sep));
  }
  throw new Error(`unexpected DefinitionString ${JSON.stringify(value)}`);
}

function normalizeResource(res: Json): Json {
  const out: Json = { Type: res.Type, Properties: { ...(res.Properties ?? {}) } };
  for (const k of ['DeletionPolicy', 'UpdateReplacePolicy', 'Condition', 'DependsOn']) {
    if (res[k] !== undefined) out[k] = res[k];
  }
  const p = out.Properties;
  if (Array.isArray(p.Tags)) {
    p.Tags = p.Tags.filter((t: Json) => !TOOL_TAGS.has(t.Key));
    if (p.Tags.length === 0) delete p.Tags;
  }
  if (res.Type === 'AWS::Lambda::Function') delete p.Code;
  if (res.Type === 'AWS::StepFunctions::StateMachine') p.DefinitionString = definition(p.DefinitionString);
  return out;
}

function normalize(t: Json): Json {
  const resources: Json = {};
  for (const [id, res] of Object.entries<Json>(t.Resources ?? {})) {
    if (res.Type === 'AWS::CDK::Metadata') continue;
    resources[id] = normalizeResource(res);
  }
  return {
    Description: t.Description,
    Metadata: t.Metadata,
    Parameters: t.Parameters,
    Conditions: t.Conditions,
    Resources: resources,
    Outputs: t.Outputs,
  };
}

const cdk = normalize(synthesized());

test('CDK synthesizes the resources of template.yaml, each with the same properties', () => {
  const sam = normalize(samTemplate());
  assert.deepEqual(Object.keys(cdk.Resources).sort(), Object.keys(sam.Resources).sort(), 'logical ids differ');
  for (const id of Object.keys(sam.Resources)) {
    assert.deepEqual(cdk.Resources[id], sam.Resources[id], `resource ${id} differs`);
  }
});

test('CDK has the parameters, conditions, outputs and interface of template.yaml', () => {
  const sam = normalize(samTemplate());
  assert.deepEqual(cdk.Parameters, sam.Parameters);
  assert.deepEqual(cdk.Conditions, sam.Conditions);
  assert.deepEqual(cdk.Outputs, sam.Outputs);
  assert.deepEqual(cdk.Metadata, sam.Metadata);
  assert.equal(cdk.Description, sam.Description);
});

test('every function is arm64 on provided.al2023 with its own role and log group', () => {
  const fns = Object.entries<Json>(cdk.Resources).filter(([, r]) => r.Type === 'AWS::Lambda::Function');
  assert.equal(fns.length, 4);
  const roles = new Set<string>();
  for (const [id, fn] of fns) {
    assert.deepEqual(fn.Properties.Architectures, ['arm64'], id);
    assert.equal(fn.Properties.Runtime, 'provided.al2023', id);
    roles.add(JSON.stringify(fn.Properties.Role));
    const group = fn.Properties.LoggingConfig.LogGroup.Ref;
    const role = cdk.Resources[fn.Properties.Role['Fn::GetAtt'][0]];
    const logs = role.Properties.Policies[0].PolicyDocument.Statement.find((s: Json) => s.Sid === 'WriteOwnLogs');
    assert.deepEqual(logs.Resource, { 'Fn::GetAtt': [group, 'Arn'] }, `${id} writes another log group`);
  }
  assert.equal(roles.size, 4, 'functions share a role');
  // Reserved concurrency only when asked (new accounts refuse it): the lease keeps one poller.
  assert.deepEqual(cdk.Resources.CdcPollerFunction.Properties.ReservedConcurrentExecutions, {
    'Fn::If': ['HasPollerReservation', { Ref: 'PollerReservedConcurrency' }, { Ref: 'AWS::NoValue' }],
  });
  for (const [id, fn] of fns) {
    const logging = fn.Properties.LoggingConfig;
    assert.equal(logging.LogFormat, 'JSON', `${id} logs JSON`);
    assert.equal(logging.ApplicationLogLevel, 'INFO', id);
  }
});

test('no function statement allows "*" except network interfaces in a VPC and X-Ray segments', () => {
  for (const [id, res] of Object.entries<Json>(cdk.Resources)) {
    if (id === 'FullLoadStateMachineRole') continue;
    let docs: Json[];
    if (res.Type === 'AWS::IAM::Role') {
      assert.equal(res.Properties.ManagedPolicyArns, undefined, `${id} has managed policies`);
      docs = res.Properties.Policies.map((p: Json) => p.PolicyDocument);
    } else if (res.Type === 'AWS::IAM::Policy') {
      docs = [res.Properties.PolicyDocument];
      if (id === 'VpcAccessPolicy') assert.equal(res.Condition, 'InVpc');
      if (id === 'TracingPolicy') assert.equal(res.Condition, 'Traced');
    } else {
      continue;
    }
    for (const doc of docs) {
      for (const s of doc.Statement) {
        const actions = [s.Action].flat();
        if (s.Resource === '*') {
          const allowed = id === 'TracingPolicy' ? 'xray:' : 'ec2:';
          assert.ok(actions.every((a: string) => a.startsWith(allowed)), `${id}: ${actions} on *`);
        }
        assert.ok(!actions.some((a: string) => a.endsWith(':*') || a === '*'), `${id}: wildcard action ${actions}`);
      }
    }
  }
});
