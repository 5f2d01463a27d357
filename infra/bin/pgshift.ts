#!/usr/bin/env node
// `npx cdk synth` / `npx cdk deploy`: the pgshift stack (parameters as in template.yaml, given
// with `--parameters Name=value`). The stack name is PGSHIFT_STACK_NAME or `pgshift`.
// PGSHIFT_CDK_NO_BUILD=1 synthesizes without running `cargo lambda build` (a template to read).
import { App, DefaultStackSynthesizer } from 'aws-cdk-lib';
import { PgshiftStack } from '../lib/pgshift-stack';

const app = new App();
if (process.env.PGSHIFT_CDK_NO_BUILD) {
  // Overrides the CLI's own setting (it asks to bundle every stack it synthesizes).
  app.node.setContext('aws:cdk:bundling-stacks', []);
}
new PgshiftStack(app, 'Pgshift', {
  stackName: process.env.PGSHIFT_STACK_NAME ?? 'pgshift',
  synthesizer: new DefaultStackSynthesizer({ generateBootstrapVersionRule: false }),
});
app.synth();
