#!/usr/bin/env node
// `npx cdk synth` / `npx cdk deploy`: the pgshift stack (parameters as in template.yaml, given
// with `--parameters Name=value`). The stack name is PGSHIFT_STACK_NAME or `pgshift`.
import { App, DefaultStackSynthesizer } from 'aws-cdk-lib';
import { PgshiftStack } from '../lib/pgshift-stack';

const app = new App();
new PgshiftStack(app, 'Pgshift', {
  stackName: process.env.PGSHIFT_STACK_NAME ?? 'pgshift',
  synthesizer: new DefaultStackSynthesizer({ generateBootstrapVersionRule: false }),
});
app.synth();
