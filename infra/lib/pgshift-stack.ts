// The pgshift stack in CDK: the same resources, logical ids, parameters and permissions as
// ../template.yaml (test/stack.test.ts compares the two templates). Resources are L1 so that
// every property is the one the SAM template states; the functions are `RustFunction`s from
// cargo-lambda-cdk, which build the workspace's binaries with `cargo lambda build --release`.
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  Aws,
  CfnCondition,
  CfnDeletionPolicy,
  CfnOutput,
  CfnParameter,
  CfnResource,
  CfnRule,
  Fn,
  Stack,
  StackProps,
} from 'aws-cdk-lib';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import * as events from 'aws-cdk-lib/aws-events';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3 from 'aws-cdk-lib/aws-s3';
import * as scheduler from 'aws-cdk-lib/aws-scheduler';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import { RustFunction } from 'cargo-lambda-cdk';
import { Construct } from 'constructs';

/** The repository root: the Cargo workspace and infra/statemachine live there. */
export const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');

const LOG_RETENTION_DAYS = [
  1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
  3288, 3653,
];

type Statement = Record<string, unknown>;

export class PgshiftStack extends Stack {
  constructor(scope: Construct, id: string, props?: StackProps) {
    super(scope, id, props);
    this.templateOptions.description =
      'pgshift: PostgreSQL to S3 full load and change data capture without a replication instance. ' +
      'Rust Lambda functions (endpoint test, full load, scheduled CDC poller, and with a target the ' +
      'event-driven apply), a Step Functions full-load state machine, an S3 staging bucket and a ' +
      'DynamoDB state table; events on EventBridge. infra/ synthesizes the same stack with CDK; ' +
      'infra/README.md explains the parameters and prerequisites.';
    this.templateOptions.metadata = {
      'AWS::CloudFormation::Interface': {
        ParameterGroups: [
          {
            Label: { default: 'Source' },
            Parameters: [
              'SourceSecretArn',
              'SourceSecretKmsKeyArn',
              'SourceSslMode',
              'SubnetIds',
              'SecurityGroupIds',
              'VpcEndpoints',
              'VpcId',
              'RouteTableIds',
            ],
          },
          {
            Label: { default: 'Task' },
            Parameters: [
              'TaskName',
              'TableMappings',
              'CaptureChanges',
              'StageFormat',
              'S3Settings',
              'CommitTimestampColumn',
              'ChunkMb',
              'MaxConcurrency',
              'ChunkWorkflowType',
            ],
          },
          {
            Label: { default: 'CDC poller' },
            Parameters: [
              'PollSchedule',
              'PollerState',
              'NativeStartSlot',
              'NativeStartPublication',
              'CdcStartPosition',
              'CdcStopPosition',
              'PollerTimeoutSeconds',
              'PollerReservedConcurrency',
            ],
          },
          {
            Label: { default: 'Events and apply to a PostgreSQL target' },
            Parameters: ['EventsBusName', 'TargetSecretArn', 'TargetSslMode', 'TargetPrep', 'ApplyLagAlarmSeconds'],
          },
          {
            Label: { default: 'Operations' },
            Parameters: [
              'LogRetentionDays',
              'LatencyAlarmSeconds',
              'RetainedBytesAlarmThreshold',
              'AlarmTopicArn',
              'DataKmsKeyArn',
              'StageBucketVersioning',
              'Tracing',
            ],
          },
        ],
      },
    };

    // ------------------------------------------------------------------ parameters
    const taskName = new CfnParameter(this, 'TaskName', {
      type: 'String',
      default: 'pgshift',
      allowedPattern: '[a-z][a-z0-9-]{0,47}',
      description:
        "Task id: the S3 prefix, the state items' key and the slot/publication name (pgshift_<task>, hyphens as underscores).",
    });
    const sourceSecretArn = new CfnParameter(this, 'SourceSecretArn', {
      type: 'String',
      allowedPattern: 'arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+-[A-Za-z0-9]{6}',
      constraintDescription:
        "the secret's complete ARN, with the six characters Secrets Manager appends (a partial ARN is denied by IAM)",
      description: 'Secrets Manager secret of the source, in the DMS shape {host, port, username, password, dbname}.',
    });
    const secretKey = new CfnParameter(this, 'SourceSecretKmsKeyArn', {
      type: 'String',
      default: '',
      description: 'Customer managed KMS key that encrypts the secret (empty when it uses the AWS managed key).',
    });
    const sslMode = new CfnParameter(this, 'SourceSslMode', {
      type: 'String',
      default: 'auto',
      allowedValues: ['auto', 'require', 'verify-ca', 'verify-full'],
      description:
        'TLS mode for secrets that do not name one. auto: verify-full on RDS/Aurora hosts (the RDS certificate authorities are built in), require elsewhere. A secret\'s sslrootcert may hold PEM certificates of a private CA.',
    });
    const subnetIds = new CfnParameter(this, 'SubnetIds', {
      type: 'CommaDelimitedList',
      default: '',
      description:
        'Private subnets that reach the source (empty runs the functions outside a VPC). They need a route to S3, DynamoDB and Secrets Manager (VPC endpoints or a NAT gateway).',
    });
    const securityGroupIds = new CfnParameter(this, 'SecurityGroupIds', {
      type: 'CommaDelimitedList',
      default: '',
      description: "Security groups for the functions; the source's group must allow them on its port.",
    });
    const vpcEndpoints = new CfnParameter(this, 'VpcEndpoints', {
      type: 'String',
      default: 'none',
      allowedValues: ['none', 'create'],
      description:
        'create: the stack adds what the functions need in a VPC without a NAT gateway: S3 and DynamoDB gateway endpoints (on RouteTableIds), Secrets Manager, EventBridge and (with a target) SQS interface endpoints in SubnetIds, and a security group that lets the functions reach them. none: the subnets already route to these services.',
    });
    const vpcId = new CfnParameter(this, 'VpcId', {
      type: 'String',
      default: '',
      allowedPattern: '(vpc-[0-9a-f]{8,17})?',
      description: 'The VPC of SubnetIds (needed with VpcEndpoints=create).',
    });
    const routeTableIds = new CfnParameter(this, 'RouteTableIds', {
      type: 'CommaDelimitedList',
      default: '',
      description: 'Route tables of SubnetIds, for the gateway endpoints (VpcEndpoints=create).',
    });
    const notEmptyList = (p: CfnParameter) => Fn.conditionNot(Fn.conditionEachMemberEquals(p.valueAsList, ''));
    new CfnRule(this, 'SubnetsNeedSecurityGroups', {
      ruleCondition: notEmptyList(subnetIds),
      assertions: [
        {
          assert: notEmptyList(securityGroupIds),
          assertDescription:
            'SubnetIds need SecurityGroupIds (Lambda refuses a VPC configuration without security groups)',
        },
      ],
    });
    new CfnRule(this, 'EndpointsNeedTheVpc', {
      ruleCondition: Fn.conditionEquals(vpcEndpoints.valueAsString, 'create'),
      assertions: [
        { assert: Fn.conditionNot(Fn.conditionEquals(vpcId.valueAsString, '')), assertDescription: 'VpcEndpoints=create needs VpcId' },
        {
          assert: notEmptyList(subnetIds),
          assertDescription: 'VpcEndpoints=create needs SubnetIds (the interface endpoints go there)',
        },
        {
          assert: notEmptyList(routeTableIds),
          assertDescription: 'VpcEndpoints=create needs RouteTableIds (the S3 and DynamoDB gateway endpoints)',
        },
      ],
    });
    const tableMappings = new CfnParameter(this, 'TableMappings', {
      type: 'String',
      default: '',
      description: 'DMS table-mapping JSON (selection rules); empty selects every user table.',
    });
    const captureChanges = new CfnParameter(this, 'CaptureChanges', {
      type: 'String',
      default: 'true',
      allowedValues: ['true', 'false'],
      description:
        "true: the full load creates the slot first and CDC follows from its consistent point. false: a full-load-only task (no slot pinning WAL; the poller's schedule stays disabled).",
    });
    const stageFormat = new CfnParameter(this, 'StageFormat', {
      type: 'String',
      default: 'csv',
      allowedValues: ['csv', 'csv.gz', 'jsonl', 'jsonl.gz', 'parquet'],
      description: 'Format of staged files (parquet: typed columns, full load and CDC).',
    });
    const s3Settings = new CfnParameter(this, 'S3Settings', {
      type: 'String',
      default: '',
      description:
        "DMS S3Settings JSON (as for aws dms create-endpoint): DataFormat, CompressionType, TimestampColumnName, IncludeOpForFullLoad, CdcInsertsOnly/CdcInsertsAndUpdates, AddColumnName, CsvDelimiter/CsvNullValue/CsvRowDelimiter, DatePartition*, EncryptionMode are honoured; BucketName/BucketFolder, when given, must be this stack's bucket and the task's folder; any setting pgshift does not honour fails the functions with its name (docs/DMS-S3-SETTINGS.md). Empty: StageFormat decides.",
    });
    const commitTs = new CfnParameter(this, 'CommitTimestampColumn', {
      type: 'String',
      default: 'false',
      allowedValues: ['true', 'false'],
      description: "true adds the source commit timestamp column to CDC rows (DMS's TimestampColumnName).",
    });
    const chunkMb = new CfnParameter(this, 'ChunkMb', {
      type: 'Number',
      default: 256,
      minValue: 1,
      maxValue: 65536,
      description: 'Target heap size of one full-load chunk (one Lambda invocation each).',
    });
    const maxConcurrency = new CfnParameter(this, 'MaxConcurrency', {
      type: 'Number',
      default: 8,
      minValue: 1,
      maxValue: 1000,
      description: 'Chunks exported at once by the full-load state machine.',
    });
    const chunkWorkflowType = new CfnParameter(this, 'ChunkWorkflowType', {
      type: 'String',
      default: 'EXPRESS',
      allowedValues: ['EXPRESS', 'STANDARD'],
      description:
        "Child workflows of a large load's Distributed Map (one per chunk). EXPRESS costs about a tenth of STANDARD's transitions (docs/COST.md) but a child has 5 minutes: keep a chunk under ~4 minutes of export (the default 256 MB chunk takes seconds); STANDARD for huge chunks.",
    });
    const pollSchedule = new CfnParameter(this, 'PollSchedule', {
      type: 'String',
      default: 'rate(1 minute)',
      allowedPattern: '(rate|cron)\\(.+\\)',
      description: 'EventBridge Scheduler expression that starts the CDC poller.',
    });
    const nativeSlot = new CfnParameter(this, 'NativeStartSlot', {
      type: 'String',
      default: '',
      allowedPattern: '^[a-z0-9_]{0,63}$',
      description:
        "Native start (DMS's slotName): the user's pgoutput slot, made after NativeStartPublication; never changed nor dropped. Needs CaptureChanges false. Empty: pgshift's own slot.",
    });
    const nativePublication = new CfnParameter(this, 'NativeStartPublication', {
      type: 'String',
      default: '',
      maxLength: 63,
      description: "Native start: the user's publication (made before the slot).",
    });
    const cdcStartPosition = new CfnParameter(this, 'CdcStartPosition', {
      type: 'String',
      default: '',
      allowedPattern: '^$|^(lsn:)?[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$',
      description:
        "Native start (DMS's CdcStartPosition): the WAL position (X/Y) to start after. Empty: the slot's confirmed position.",
    });
    const cdcStopPosition = new CfnParameter(this, 'CdcStopPosition', {
      type: 'String',
      default: '',
      allowedPattern: '^$|^(lsn:)?[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$|^commit_time:.+$',
      description:
        "DMS's CdcStopPosition: X/Y or commit_time:YYYY-MM-DDTHH:MM:SS (UTC unless an offset is given); nothing committed after it is staged. Empty: no stop.",
    });
    const pollerState = new CfnParameter(this, 'PollerState', {
      type: 'String',
      default: 'DISABLED',
      allowedValues: ['ENABLED', 'DISABLED'],
      description:
        'ENABLED starts the schedule. Deploy DISABLED, start the full load (its Plan creates the slot), then enable; enabled first, the poller creates the slot itself (a CDC-only task).',
    });
    const pollerReserved = new CfnParameter(this, 'PollerReservedConcurrency', {
      type: 'Number',
      default: 0,
      minValue: 0,
      maxValue: 1,
      description:
        '1 reserves one concurrent execution for the poller (at most one runs; the lease already ensures one drains). 0 (default) reserves none: a new or low-quota account refuses a reservation that leaves it fewer than 10 unreserved.',
    });
    const pollerTimeout = new CfnParameter(this, 'PollerTimeoutSeconds', {
      type: 'Number',
      default: 60,
      minValue: 30,
      maxValue: 900,
      description:
        "The poller's Lambda timeout; it stops cleanly before it, at a batch boundary, and the next tick goes on. Keep it at most the schedule's period: a tick that starts while the last run holds the lease exits at once (and with reserved concurrency 1 waiting ticks can expire into the dead-letter queue).",
    });
    const eventsBus = new CfnParameter(this, 'EventsBusName', {
      type: 'String',
      default: 'default',
      allowedPattern: '[/\\.\\-_A-Za-z0-9]{1,256}',
      description:
        'An existing EventBridge bus (name) pgshift puts its events on (Batch Committed, Table Loaded, Load Finished, Task State Changed); `default` is the account\'s default bus.',
    });
    const targetSecretArn = new CfnParameter(this, 'TargetSecretArn', {
      type: 'String',
      default: '',
      allowedPattern: '(arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+-[A-Za-z0-9]{6})?',
      constraintDescription: 'empty, or the secret\'s complete ARN (with the six characters Secrets Manager appends)',
      description:
        'Secrets Manager secret of a PostgreSQL target ({host, port, username, password, dbname}). Set, the stack adds the apply function, fed by a rule on the bus through an SQS FIFO queue; empty, no apply.',
    });
    const targetSslMode = new CfnParameter(this, 'TargetSslMode', {
      type: 'String',
      default: 'auto',
      allowedValues: ['auto', 'require', 'verify-ca', 'verify-full'],
      description: 'TLS mode for a target secret that does not name one (auto as for the source).',
    });
    const targetPrep = new CfnParameter(this, 'TargetPrep', {
      type: 'String',
      default: 'create',
      allowedValues: ['create', 'truncate', 'keep'],
      description:
        "How apply prepares the target for the load (DMS's TargetTablePrepMode): create builds the source's schema; truncate and keep use the tables the target has.",
    });
    const applyLagAlarm = new CfnParameter(this, 'ApplyLagAlarmSeconds', {
      type: 'Number',
      default: 900,
      minValue: 60,
      description: "Alarm when the apply queue's oldest message is older than this.",
    });
    const logRetention = new CfnParameter(this, 'LogRetentionDays', {
      type: 'Number',
      default: '30',
      allowedValues: LOG_RETENTION_DAYS.map(String),
      description: "Retention of the functions' and the state machine's log groups.",
    });
    const latencyAlarm = new CfnParameter(this, 'LatencyAlarmSeconds', {
      type: 'Number',
      default: 900,
      minValue: 1,
      description: 'Alarm when CDCLatencySource (source commit to staged) stays above this.',
    });
    const retainedAlarm = new CfnParameter(this, 'RetainedBytesAlarmThreshold', {
      type: 'Number',
      default: 10737418240,
      minValue: 1,
      description: 'Alarm when the slot retains more WAL than this many bytes on the source.',
    });
    const alarmTopic = new CfnParameter(this, 'AlarmTopicArn', {
      type: 'String',
      default: '',
      description: 'SNS topic notified by the alarms (empty for none).',
    });
    const dataKey = new CfnParameter(this, 'DataKmsKeyArn', {
      type: 'String',
      default: '',
      allowedPattern: '(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[0-9a-f-]{36})?',
      constraintDescription: "empty, or a KMS key's ARN (arn:aws:kms:<region>:<account>:key/<id>)",
      description:
        'Customer managed KMS key for the staged data, the state table, the queues and the log groups (empty: AWS-owned keys). Its key policy must let CloudWatch Logs (logs.<region>.amazonaws.com), EventBridge Scheduler (the poller\'s dead-letter queue) and, with a target, EventBridge use it; the stack grants the functions and the state machine.',
    });
    const tracing = new CfnParameter(this, 'Tracing', {
      type: 'String',
      default: 'PassThrough',
      allowedValues: ['PassThrough', 'Active'],
      description:
        "Active traces every function invocation and the full-load state machine with X-Ray (the functions' and the state machine's roles may then write trace segments).",
    });
    const versioning = new CfnParameter(this, 'StageBucketVersioning', {
      type: 'String',
      default: 'false',
      allowedValues: ['true', 'false'],
      description: 'true keeps overwritten or deleted staged objects as noncurrent versions for 7 days.',
    });

    // ------------------------------------------------------------------ conditions
    const inVpc = new CfnCondition(this, 'InVpc', {
      expression: Fn.conditionNot(Fn.conditionEquals(Fn.join('', subnetIds.valueAsList), '')),
    });
    const hasSecretKey = new CfnCondition(this, 'HasSecretKey', {
      expression: Fn.conditionNot(Fn.conditionEquals(secretKey.valueAsString, '')),
    });
    const hasAlarmTopic = new CfnCondition(this, 'HasAlarmTopic', {
      expression: Fn.conditionNot(Fn.conditionEquals(alarmTopic.valueAsString, '')),
    });
    const hasPollerReservation = new CfnCondition(this, 'HasPollerReservation', {
      expression: Fn.conditionEquals(pollerReserved.valueAsNumber, 1),
    });
    const capturesChanges = new CfnCondition(this, 'CapturesChanges', {
      expression: Fn.conditionEquals(captureChanges.valueAsString, 'true'),
    });
    const nativeStart = new CfnCondition(this, 'NativeStart', {
      expression: Fn.conditionNot(Fn.conditionEquals(nativeSlot.valueAsString, '')),
    });
    const hasTarget = new CfnCondition(this, 'HasTarget', {
      expression: Fn.conditionNot(Fn.conditionEquals(targetSecretArn.valueAsString, '')),
    });
    const pollerEnabled = new CfnCondition(this, 'PollerEnabled', {
      expression: Fn.conditionAnd(capturesChanges, Fn.conditionEquals(pollerState.valueAsString, 'ENABLED')),
    });
    const createsEndpoints = new CfnCondition(this, 'CreatesEndpoints', {
      expression: Fn.conditionAnd(inVpc, Fn.conditionEquals(vpcEndpoints.valueAsString, 'create')),
    });
    const createsApplyEndpoint = new CfnCondition(this, 'CreatesApplyEndpoint', {
      expression: Fn.conditionAnd(createsEndpoints, hasTarget),
    });
    const hasDataKey = new CfnCondition(this, 'HasDataKey', {
      expression: Fn.conditionNot(Fn.conditionEquals(dataKey.valueAsString, '')),
    });
    const versionsStage = new CfnCondition(this, 'VersionsStage', {
      expression: Fn.conditionEquals(versioning.valueAsString, 'true'),
    });
    const traced = new CfnCondition(this, 'Traced', {
      expression: Fn.conditionEquals(tracing.valueAsString, 'Active'),
    });
    const ifKey = <T>(withKey: T, without: T): T =>
      Fn.conditionIf(hasDataKey.logicalId, withKey, without) as unknown as T;
    const keyOrNothing = Fn.conditionIf(hasDataKey.logicalId, dataKey.valueAsString, Aws.NO_VALUE).toString();
    // Bounded names (80 characters) whatever the stack's name: the task and the stack id's
    // first 8 hex digits.
    const stackShortId = { Id: Fn.select(0, Fn.split('-', Fn.select(2, Fn.split('/', Aws.STACK_ID)))) };
    const bounded = (pattern: string) => Fn.sub(pattern, stackShortId);

    // ------------------------------------------------------------------ staged data and state
    const bucket = new s3.CfnBucket(this, 'StageBucket', {
      bucketEncryption: {
        serverSideEncryptionConfiguration: [
          {
            serverSideEncryptionByDefault: ifKey<s3.CfnBucket.ServerSideEncryptionByDefaultProperty>(
              // Inside Fn::If the objects are CloudFormation's, property names as CloudFormation spells them.
              { SSEAlgorithm: 'aws:kms', KMSMasterKeyID: dataKey.valueAsString } as never,
              { SSEAlgorithm: 'AES256' } as never,
            ),
            bucketKeyEnabled: true,
          },
        ],
      },
      publicAccessBlockConfiguration: {
        blockPublicAcls: true,
        blockPublicPolicy: true,
        ignorePublicAcls: true,
        restrictPublicBuckets: true,
      },
      ownershipControls: { rules: [{ objectOwnership: 'BucketOwnerEnforced' }] },
      lifecycleConfiguration: {
        rules: [
          {
            id: 'abort-abandoned-multipart-uploads',
            status: 'Enabled',
            abortIncompleteMultipartUpload: { daysAfterInitiation: 2 },
          },
          Fn.conditionIf(
            versionsStage.logicalId,
            { Id: 'expire-noncurrent-versions', Status: 'Enabled', NoncurrentVersionExpiration: { NoncurrentDays: 7 } },
            Aws.NO_VALUE,
          ) as unknown as s3.CfnBucket.RuleProperty,
        ],
      },
      versioningConfiguration: Fn.conditionIf(
        versionsStage.logicalId,
        { Status: 'Enabled' },
        Aws.NO_VALUE,
      ) as unknown as s3.CfnBucket.VersioningConfigurationProperty,
    });
    retain(bucket);
    new s3.CfnBucketPolicy(this, 'StageBucketPolicy', {
      bucket: bucket.ref,
      policyDocument: {
        Version: '2012-10-17',
        Statement: [
          {
            Sid: 'DenyInsecureTransport',
            Effect: 'Deny',
            Principal: '*',
            Action: 's3:*',
            Resource: [bucket.attrArn, Fn.sub('${StageBucket.Arn}/*')],
            Condition: { Bool: { 'aws:SecureTransport': 'false' } },
          },
        ],
      },
    });
    const table = new dynamodb.CfnTable(this, 'StateTable', {
      billingMode: 'PAY_PER_REQUEST',
      attributeDefinitions: [
        { attributeName: 'pk', attributeType: 'S' },
        { attributeName: 'sk', attributeType: 'S' },
      ],
      keySchema: [
        { attributeName: 'pk', keyType: 'HASH' },
        { attributeName: 'sk', keyType: 'RANGE' },
      ],
      pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
      sseSpecification: ifKey<dynamodb.CfnTable.SSESpecificationProperty>(
        { SSEEnabled: true, SSEType: 'KMS', KMSMasterKeyId: dataKey.valueAsString } as never,
        { SSEEnabled: true } as never,
      ),
    });
    retain(table);
    const dlq = new sqs.CfnQueue(this, 'PollerDeadLetterQueue', {
      messageRetentionPeriod: 1209600,
      sqsManagedSseEnabled: ifKey<boolean | undefined>(Aws.NO_VALUE as unknown as undefined, true),
      kmsMasterKeyId: keyOrNothing,
    });

    // ------------------------------------------------------------------ logs
    const logGroup = (id: string, name: string) =>
      new logs.CfnLogGroup(this, id, {
        logGroupName: Fn.sub(name),
        retentionInDays: logRetention.valueAsNumber,
        kmsKeyId: keyOrNothing,
      });
    const testEndpointLogs = logGroup('TestEndpointLogGroup', '/aws/lambda/${AWS::StackName}-test-endpoint');
    const fullLoadLogs = logGroup('FullLoadLogGroup', '/aws/lambda/${AWS::StackName}-full-load');
    const pollerLogs = logGroup('CdcPollerLogGroup', '/aws/lambda/${AWS::StackName}-cdc-poller');
    const applyLogs = logGroup('ApplyLogGroup', '/aws/lambda/${AWS::StackName}-apply');
    applyLogs.cfnOptions.condition = hasTarget;
    const stateMachineLogs = logGroup('StateMachineLogGroup', '/aws/vendedlogs/states/${AWS::StackName}-full-load');

    // ------------------------------------------------------------------ least-privilege roles
    const policy = (name: string, statements: Statement[]) => ({
      policyName: name,
      policyDocument: { Version: '2012-10-17', Statement: statements },
    });
    const ownLogs = (group: logs.CfnLogGroup): Statement => ({
      Sid: 'WriteOwnLogs',
      Effect: 'Allow',
      Action: ['logs:CreateLogStream', 'logs:PutLogEvents'],
      Resource: group.attrArn,
    });
    const readSecret: Statement = {
      Sid: 'ReadSourceSecret',
      Effect: 'Allow',
      Action: 'secretsmanager:GetSecretValue',
      Resource: sourceSecretArn.valueAsString,
    };
    const stageAccess: Statement[] = [
      {
        Sid: 'StageObjects',
        Effect: 'Allow',
        Action: ['s3:PutObject', 's3:GetObject', 's3:AbortMultipartUpload'],
        Resource: Fn.sub('${StageBucket.Arn}/${TaskName}/*'),
      },
      {
        Sid: 'ListStage',
        Effect: 'Allow',
        Action: 's3:ListBucket',
        Resource: bucket.attrArn,
        Condition: { StringLike: { 's3:prefix': Fn.sub('${TaskName}/*') } },
      },
      {
        Sid: 'TaskState',
        Effect: 'Allow',
        Action: ['dynamodb:GetItem', 'dynamodb:PutItem'],
        Resource: table.attrArn,
        Condition: { 'ForAllValues:StringEquals': { 'dynamodb:LeadingKeys': [taskName.valueAsString] } },
      },
    ];
    const lambdaRole = (id: string, name: string, statements: Statement[]) =>
      new iam.CfnRole(this, id, {
        assumeRolePolicyDocument: {
          Version: '2012-10-17',
          Statement: [{ Effect: 'Allow', Principal: { Service: 'lambda.amazonaws.com' }, Action: 'sts:AssumeRole' }],
        },
        policies: [policy(name, statements)],
      });
    const testEndpointRole = lambdaRole('TestEndpointRole', 'pgshift-test-endpoint', [
      ownLogs(testEndpointLogs),
      readSecret,
    ]);
    const putEvents: Statement = {
      Sid: 'PutEvents',
      Effect: 'Allow',
      Action: 'events:PutEvents',
      Resource: Fn.sub('arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/${EventsBusName}'),
    };
    const fullLoadRole = lambdaRole('FullLoadRole', 'pgshift-full-load', [
      ownLogs(fullLoadLogs),
      readSecret,
      ...stageAccess,
      putEvents,
    ]);
    const pollerRole = lambdaRole('CdcPollerRole', 'pgshift-cdc-poller', [
      ownLogs(pollerLogs),
      readSecret,
      ...stageAccess,
      { Sid: 'ReportFailedRuns', Effect: 'Allow', Action: 'sqs:SendMessage', Resource: dlq.attrArn },
      putEvents,
    ]);

    // ------------------------------------------------------------------ event-driven apply queue
    const applyDlq = new sqs.CfnQueue(this, 'ApplyDeadLetterQueue', {
      queueName: bounded('pgshift-${TaskName}-${Id}-apply-dlq.fifo'),
      fifoQueue: true,
      messageRetentionPeriod: 1209600,
      sqsManagedSseEnabled: ifKey<boolean | undefined>(Aws.NO_VALUE as unknown as undefined, true),
      kmsMasterKeyId: keyOrNothing,
    });
    applyDlq.cfnOptions.condition = hasTarget;
    const applyQueue = new sqs.CfnQueue(this, 'ApplyQueue', {
      queueName: bounded('pgshift-${TaskName}-${Id}-apply.fifo'),
      fifoQueue: true,
      contentBasedDeduplication: true,
      visibilityTimeout: 960,
      messageRetentionPeriod: 1209600,
      sqsManagedSseEnabled: ifKey<boolean | undefined>(Aws.NO_VALUE as unknown as undefined, true),
      kmsMasterKeyId: keyOrNothing,
      redrivePolicy: { deadLetterTargetArn: applyDlq.attrArn, maxReceiveCount: 5 },
    });
    applyQueue.cfnOptions.condition = hasTarget;
    const applyRule = new events.CfnRule(this, 'ApplyRule', {
      description: Fn.sub('pgshift ${TaskName}: staged batches and the finished load, to the apply queue'),
      eventBusName: eventsBus.valueAsString,
      eventPattern: {
        source: ['pgshift'],
        'detail-type': ['Batch Committed', 'Load Finished'],
        detail: { task: [taskName.valueAsString] },
      },
      targets: [{ id: 'apply-queue', arn: applyQueue.attrArn, sqsParameters: { messageGroupId: taskName.valueAsString } }],
    });
    applyRule.cfnOptions.condition = hasTarget;
    const applyQueuePolicy = new sqs.CfnQueuePolicy(this, 'ApplyQueuePolicy', {
      queues: [applyQueue.ref],
      policyDocument: {
        Version: '2012-10-17',
        Statement: [
          {
            Sid: 'FromTheRule',
            Effect: 'Allow',
            Principal: { Service: 'events.amazonaws.com' },
            Action: 'sqs:SendMessage',
            Resource: applyQueue.attrArn,
            Condition: { ArnEquals: { 'aws:SourceArn': applyRule.attrArn } },
          },
        ],
      },
    });
    applyQueuePolicy.cfnOptions.condition = hasTarget;
    const applyRole = lambdaRole('ApplyRole', 'pgshift-apply', [
      ownLogs(applyLogs),
      {
        Sid: 'ReadTargetSecret',
        Effect: 'Allow',
        Action: 'secretsmanager:GetSecretValue',
        Resource: targetSecretArn.valueAsString,
      },
      { Sid: 'ReadStage', Effect: 'Allow', Action: 's3:GetObject', Resource: Fn.sub('${StageBucket.Arn}/${TaskName}/*') },
      stageAccess[1],
      {
        Sid: 'OwnQueue',
        Effect: 'Allow',
        Action: [
          'sqs:ReceiveMessage',
          'sqs:DeleteMessage',
          'sqs:GetQueueAttributes',
          'sqs:ChangeMessageVisibility',
          'sqs:SendMessage',
        ],
        Resource: applyQueue.attrArn,
      },
      putEvents,
    ]);
    applyRole.cfnOptions.condition = hasTarget;

    // Only with a customer managed key on the secret / only in a VPC. Network-interface actions
    // have no resource-level permissions in EC2.
    const roles = Fn.conditionIf(
      hasTarget.logicalId,
      [testEndpointRole.ref, fullLoadRole.ref, pollerRole.ref, applyRole.ref],
      [testEndpointRole.ref, fullLoadRole.ref, pollerRole.ref],
    ) as unknown as string[];
    const secretKeyPolicy = new iam.CfnPolicy(this, 'SourceSecretKeyPolicy', {
      policyName: 'pgshift-secret-key',
      roles,
      policyDocument: {
        Version: '2012-10-17',
        Statement: [
          { Sid: 'DecryptSourceSecret', Effect: 'Allow', Action: 'kms:Decrypt', Resource: secretKey.valueAsString },
        ],
      },
    });
    secretKeyPolicy.cfnOptions.condition = hasSecretKey;
    const vpcPolicy = new iam.CfnPolicy(this, 'VpcAccessPolicy', {
      policyName: 'pgshift-vpc-access',
      roles,
      policyDocument: {
        Version: '2012-10-17',
        Statement: [
          {
            Sid: 'VpcNetworkInterfaces',
            Effect: 'Allow',
            Action: [
              'ec2:CreateNetworkInterface',
              'ec2:DescribeNetworkInterfaces',
              'ec2:DeleteNetworkInterface',
              'ec2:AssignPrivateIpAddresses',
              'ec2:UnassignPrivateIpAddresses',
            ],
            Resource: '*',
          },
        ],
      },
    });
    vpcPolicy.cfnOptions.condition = inVpc;

    // ------------------------------------------------------------------ VPC endpoints (VpcEndpoints=create)
    const functionSg = new ec2.CfnSecurityGroup(this, 'FunctionSecurityGroup', {
      groupDescription: 'pgshift functions (added to SecurityGroupIds; the endpoints admit it)',
      vpcId: vpcId.valueAsString,
      securityGroupEgress: [{ ipProtocol: '-1', cidrIp: '0.0.0.0/0', description: 'the source and the AWS endpoints' }],
    });
    functionSg.cfnOptions.condition = createsEndpoints;
    const endpointSg = new ec2.CfnSecurityGroup(this, 'EndpointSecurityGroup', {
      groupDescription: 'pgshift interface endpoints (HTTPS from the functions)',
      vpcId: vpcId.valueAsString,
      securityGroupIngress: [
        { ipProtocol: 'tcp', fromPort: 443, toPort: 443, sourceSecurityGroupId: functionSg.ref, description: 'pgshift functions' },
      ],
    });
    endpointSg.cfnOptions.condition = createsEndpoints;
    const gateway = (id: string, service: string) => {
      const e = new ec2.CfnVPCEndpoint(this, id, {
        vpcEndpointType: 'Gateway',
        vpcId: vpcId.valueAsString,
        serviceName: Fn.sub(`com.amazonaws.\${AWS::Region}.${service}`),
        routeTableIds: routeTableIds.valueAsList,
      });
      e.cfnOptions.condition = createsEndpoints;
    };
    gateway('S3GatewayEndpoint', 's3');
    gateway('DynamoDbGatewayEndpoint', 'dynamodb');
    const iface = (id: string, service: string, condition: CfnCondition) => {
      const e = new ec2.CfnVPCEndpoint(this, id, {
        vpcEndpointType: 'Interface',
        vpcId: vpcId.valueAsString,
        serviceName: Fn.sub(`com.amazonaws.\${AWS::Region}.${service}`),
        subnetIds: subnetIds.valueAsList,
        securityGroupIds: [endpointSg.ref],
        privateDnsEnabled: true,
      });
      e.cfnOptions.condition = condition;
    };
    iface('SecretsManagerEndpoint', 'secretsmanager', createsEndpoints);
    iface('EventsEndpoint', 'events', createsEndpoints);
    iface('SqsEndpoint', 'sqs', createsApplyEndpoint);

    // ------------------------------------------------------------------ functions
    const environment: Record<string, string> = {
      PGSHIFT_TASK: taskName.valueAsString,
      PGSHIFT_SOURCE_SECRET_ARN: sourceSecretArn.valueAsString,
      PGSHIFT_SOURCE_SSLMODE: sslMode.valueAsString,
      PGSHIFT_STAGE: Fn.sub('s3://${StageBucket}/${TaskName}'),
      PGSHIFT_STATE_TABLE: table.ref,
      PGSHIFT_FORMAT: stageFormat.valueAsString,
      PGSHIFT_CDC: captureChanges.valueAsString,
      PGSHIFT_COMMIT_TS_COLUMN: commitTs.valueAsString,
      PGSHIFT_S3_SETTINGS: s3Settings.valueAsString,
      PGSHIFT_TABLE_MAPPINGS: tableMappings.valueAsString,
      PGSHIFT_CHUNK_MB: chunkMb.valueAsString,
      PGSHIFT_MAX_CONCURRENCY: maxConcurrency.valueAsString,
      PGSHIFT_EVENTS_BUS: eventsBus.valueAsString,
      PGSHIFT_CDC_STOP_POSITION: cdcStopPosition.valueAsString,
      PGSHIFT_SLOT_NAME: nativeSlot.valueAsString,
      PGSHIFT_PUBLICATION: nativePublication.valueAsString,
      PGSHIFT_CDC_START_POSITION: cdcStartPosition.valueAsString,
    };
    const vpcConfig = Fn.conditionIf(
      inVpc.logicalId,
      {
        SubnetIds: subnetIds.valueAsList,
        SecurityGroupIds: Fn.conditionIf(
          createsEndpoints.logicalId,
          Fn.split(',', Fn.join(',', [Fn.join(',', securityGroupIds.valueAsList), functionSg.ref])),
          securityGroupIds.valueAsList,
        ),
      },
      Aws.NO_VALUE,
    );
    const rustFunction = (
      id: string,
      binary: string,
      description: string,
      role: iam.CfnRole,
      group: logs.CfnLogGroup,
      memory: number,
      timeout: number,
      reserved?: number,
      extraEnvironment: Record<string, string> = {},
    ) => {
      const fn = new RustFunction(this, id, {
        manifestPath: path.join(REPO_ROOT, 'Cargo.toml'),
        binaryName: binary,
        bundling: { architecture: lambda.Architecture.ARM_64 },
        role: iam.Role.fromRoleArn(this, `${id}RoleRef`, role.attrArn, { mutable: false }),
        description,
        environment: { ...environment, ...extraEnvironment },
        memorySize: memory,
        reservedConcurrentExecutions: reserved,
      });
      const cfn = fn.node.defaultChild as lambda.CfnFunction;
      cfn.overrideLogicalId(id);
      cfn.timeout = timeout;
      cfn.loggingConfig = {
        logGroup: group.ref,
        logFormat: 'JSON',
        applicationLogLevel: 'INFO',
        systemLogLevel: 'WARN',
      };
      cfn.vpcConfig = vpcConfig;
      cfn.tracingConfig = { mode: tracing.valueAsString };
      return cfn;
    };
    rustFunction(
      'TestEndpointFunction',
      'test-endpoint',
      'pgshift endpoint test (DMS-style source assessment; read-only)',
      testEndpointRole,
      testEndpointLogs,
      256,
      30,
    );
    const fullLoad = rustFunction(
      'FullLoadFunction',
      'full-load',
      'pgshift full load (Plan, ExportChunk, Finish; driven by the state machine)',
      fullLoadRole,
      fullLoadLogs,
      1769,
      900,
      undefined,
      // 64 MiB parts, two uploading while the export goes on: a 256 MB chunk is ~5 S3 requests
      // instead of ~26, and the upload hides behind the export (docs/COST.md).
      { PGSHIFT_S3_PART_MB: '64' },
    );
    const poller = rustFunction(
      'CdcPollerFunction',
      'cdc-poller',
      'pgshift CDC poller (drains the slot into S3; one at a time)',
      pollerRole,
      pollerLogs,
      1024,
      pollerTimeout.valueAsNumber,
    );
    poller.reservedConcurrentExecutions = Fn.conditionIf(
      hasPollerReservation.logicalId,
      pollerReserved.valueAsNumber,
      Aws.NO_VALUE,
    ) as unknown as number;

    const applyFn = rustFunction(
      'ApplyFunction',
      'apply',
      "pgshift apply (PG -> PG; driven by the task's events through its queue)",
      applyRole,
      applyLogs,
      1024,
      900,
      undefined,
      {
        PGSHIFT_TARGET_SECRET_ARN: targetSecretArn.valueAsString,
        PGSHIFT_TARGET_SSLMODE: targetSslMode.valueAsString,
        PGSHIFT_TARGET_PREP: targetPrep.valueAsString,
        PGSHIFT_APPLY_QUEUE_URL: applyQueue.ref,
      },
    );
    applyFn.cfnOptions.condition = hasTarget;
    const applyMapping = new lambda.CfnEventSourceMapping(this, 'ApplyFunctionQueue', {
      eventSourceArn: applyQueue.attrArn,
      functionName: applyFn.ref,
      batchSize: 1,
    });
    applyMapping.cfnOptions.condition = hasTarget;

    // A failed run is retried by the next tick, never by Lambda; the failure is kept in the DLQ.
    new lambda.CfnEventInvokeConfig(this, 'CdcPollerFunctionEventInvokeConfig', {
      functionName: poller.ref,
      qualifier: '$LATEST',
      maximumRetryAttempts: 0,
      maximumEventAgeInSeconds: 300,
      destinationConfig: { onFailure: { destination: dlq.attrArn } },
    });
    const scheduleRole = new iam.CfnRole(this, 'CdcPollerFunctionPollRole', {
      assumeRolePolicyDocument: {
        Version: '2012-10-17',
        Statement: [{ Action: ['sts:AssumeRole'], Effect: 'Allow', Principal: { Service: ['scheduler.amazonaws.com'] } }],
      },
      policies: [
        {
          policyName: 'CdcPollerFunctionPollLambdaPolicy',
          policyDocument: {
            Statement: [{ Action: 'lambda:InvokeFunction', Effect: 'Allow', Resource: poller.attrArn }],
          },
        },
        {
          policyName: 'CdcPollerFunctionPollSQSPolicy',
          policyDocument: { Statement: [{ Action: 'sqs:SendMessage', Effect: 'Allow', Resource: dlq.attrArn }] },
        },
      ],
    });
    new scheduler.CfnSchedule(this, 'CdcPollerFunctionPoll', {
      // Schedule names are unique per account and region, 64 characters at most.
      name: bounded('${TaskName}-${Id}-poll'),
      description: Fn.sub('pgshift CDC poller for task ${TaskName}'),
      scheduleExpression: pollSchedule.valueAsString,
      state: Fn.conditionIf(capturesChanges.logicalId, pollerState.valueAsString, 'DISABLED').toString(),
      flexibleTimeWindow: { mode: 'OFF' },
      target: {
        arn: poller.attrArn,
        roleArn: scheduleRole.attrArn,
        input: '{}',
        retryPolicy: { maximumRetryAttempts: 0, maximumEventAgeInSeconds: 300 },
        deadLetterConfig: { arn: dlq.attrArn },
      },
    });
    // What the slot retains, every 5 minutes whether or not the poll schedule is enabled (a
    // disabled poller with a slot pins WAL): SlotRetainedBytes for its alarm.
    const watchRole = new iam.CfnRole(this, 'CdcPollerFunctionWatchRole', {
      assumeRolePolicyDocument: {
        Version: '2012-10-17',
        Statement: [{ Action: ['sts:AssumeRole'], Effect: 'Allow', Principal: { Service: ['scheduler.amazonaws.com'] } }],
      },
      policies: [
        {
          policyName: 'CdcPollerFunctionWatchLambdaPolicy',
          policyDocument: {
            Statement: [{ Action: 'lambda:InvokeFunction', Effect: 'Allow', Resource: poller.attrArn }],
          },
        },
      ],
    });
    new scheduler.CfnSchedule(this, 'CdcPollerFunctionWatch', {
      name: bounded('${TaskName}-${Id}-watch'),
      description: Fn.sub('pgshift slot watch for task ${TaskName}'),
      scheduleExpression: 'rate(5 minutes)',
      state: Fn.conditionIf(capturesChanges.logicalId, 'ENABLED', 'DISABLED').toString(),
      flexibleTimeWindow: { mode: 'OFF' },
      target: {
        arn: poller.attrArn,
        roleArn: watchRole.attrArn,
        input: '{"action": "Watch"}',
        retryPolicy: { maximumRetryAttempts: 2, maximumEventAgeInSeconds: 300 },
      },
    });

    // ------------------------------------------------------------------ full-load orchestration
    const machineName = 'pgshift-${TaskName}-${Id}-full-load';
    const machineRole = new iam.CfnRole(this, 'FullLoadStateMachineRole', {
      assumeRolePolicyDocument: {
        Version: '2012-10-17',
        Statement: [{ Action: ['sts:AssumeRole'], Effect: 'Allow', Principal: { Service: ['states.amazonaws.com'] } }],
      },
      managedPolicyArns: [],
      policies: [
        {
          policyName: 'FullLoadStateMachineRolePolicy0',
          policyDocument: {
            Statement: [
              {
                Sid: 'InvokeFullLoad',
                Effect: 'Allow',
                Action: 'lambda:InvokeFunction',
                Resource: [fullLoad.attrArn, Fn.sub('${FullLoadFunction.Arn}:*')],
              },
              {
                Sid: 'ReadChunkList',
                Effect: 'Allow',
                Action: 's3:GetObject',
                Resource: Fn.sub('${StageBucket.Arn}/${TaskName}/*'),
              },
              {
                Sid: 'DistributedMapChildren',
                Effect: 'Allow',
                Action: 'states:StartExecution',
                Resource: bounded(`arn:\${AWS::Partition}:states:\${AWS::Region}:\${AWS::AccountId}:stateMachine:${machineName}`),
              },
              {
                Sid: 'DistributedMapChildExecutions',
                Effect: 'Allow',
                Action: ['states:DescribeExecution', 'states:StopExecution'],
                Resource: bounded(`arn:\${AWS::Partition}:states:\${AWS::Region}:\${AWS::AccountId}:execution:${machineName}/*`),
              },
              {
                Sid: 'LogDelivery',
                Effect: 'Allow',
                Action: [
                  'logs:CreateLogDelivery',
                  'logs:GetLogDelivery',
                  'logs:UpdateLogDelivery',
                  'logs:DeleteLogDelivery',
                  'logs:ListLogDeliveries',
                  'logs:PutResourcePolicy',
                  'logs:DescribeResourcePolicies',
                  'logs:DescribeLogGroups',
                ],
                Resource: '*',
              },
            ],
          },
        },
      ],
    });
    const definition = fs.readFileSync(path.join(REPO_ROOT, 'infra', 'statemachine', 'full-load.asl.json'), 'utf8');
    const machine = new sfn.CfnStateMachine(this, 'FullLoadStateMachine', {
      stateMachineName: bounded(machineName),
      stateMachineType: 'STANDARD',
      definitionString: JSON.stringify(JSON.parse(definition)),
      definitionSubstitutions: { FullLoadFunctionArn: fullLoad.attrArn, ChunkWorkflowType: chunkWorkflowType.valueAsString },
      tracingConfiguration: { enabled: Fn.conditionIf(traced.logicalId, true, false) as unknown as boolean },
      roleArn: machineRole.attrArn,
      loggingConfiguration: {
        level: 'ERROR',
        includeExecutionData: false,
        destinations: [{ cloudWatchLogsLogGroup: { logGroupArn: stateMachineLogs.attrArn } }],
      },
    });

    const dataKeyPolicy = new iam.CfnPolicy(this, 'DataKeyPolicy', {
      policyName: 'pgshift-data-key',
      roles: Fn.conditionIf(
        hasTarget.logicalId,
        [fullLoadRole.ref, pollerRole.ref, applyRole.ref, machineRole.ref],
        [fullLoadRole.ref, pollerRole.ref, machineRole.ref],
      ) as unknown as string[],
      policyDocument: {
        Version: '2012-10-17',
        Statement: [
          { Sid: 'UseDataKey', Effect: 'Allow', Action: ['kms:Decrypt', 'kms:GenerateDataKey'], Resource: dataKey.valueAsString },
        ],
      },
    });
    dataKeyPolicy.cfnOptions.condition = hasDataKey;
    // X-Ray has no resource-level permissions for writing segments.
    const tracingPolicy = new iam.CfnPolicy(this, 'TracingPolicy', {
      policyName: 'pgshift-tracing',
      roles: Fn.conditionIf(
        hasTarget.logicalId,
        [testEndpointRole.ref, fullLoadRole.ref, pollerRole.ref, applyRole.ref, machineRole.ref],
        [testEndpointRole.ref, fullLoadRole.ref, pollerRole.ref, machineRole.ref],
      ) as unknown as string[],
      policyDocument: {
        Version: '2012-10-17',
        Statement: [
          {
            Sid: 'WriteTraces',
            Effect: 'Allow',
            Action: ['xray:PutTraceSegments', 'xray:PutTelemetryRecords', 'xray:GetSamplingRules', 'xray:GetSamplingTargets'],
            Resource: '*',
          },
        ],
      },
    });
    tracingPolicy.cfnOptions.condition = traced;

    // ------------------------------------------------------------------ alarms
    const actions = Fn.conditionIf(hasAlarmTopic.logicalId, [alarmTopic.valueAsString], Aws.NO_VALUE);
    const alarm = (id: string, props: cloudwatch.CfnAlarmProps) =>
      new cloudwatch.CfnAlarm(this, id, { ...props, alarmActions: actions as unknown as string[] });
    alarm('CdcLatencyAlarm', {
      alarmDescription: Fn.sub(
        'pgshift ${TaskName}: CDC latency (source commit to staged) above ${LatencyAlarmSeconds} s',
      ),
      namespace: 'pgshift',
      metricName: 'CDCLatencySource',
      dimensions: [{ name: 'Task', value: taskName.valueAsString }],
      statistic: 'Maximum',
      period: 300,
      evaluationPeriods: 3,
      threshold: latencyAlarm.valueAsNumber,
      comparisonOperator: 'GreaterThanThreshold',
      treatMissingData: 'missing',
    });
    alarm('SlotRetainedBytesAlarm', {
      alarmDescription: Fn.sub(
        'pgshift ${TaskName}: the replication slot retains more WAL than ${RetainedBytesAlarmThreshold} bytes on the source',
      ),
      namespace: 'pgshift',
      metricName: 'SlotRetainedBytes',
      dimensions: [{ name: 'Task', value: taskName.valueAsString }],
      statistic: 'Maximum',
      period: 300,
      evaluationPeriods: 3,
      datapointsToAlarm: 2,
      threshold: retainedAlarm.valueAsNumber,
      comparisonOperator: 'GreaterThanThreshold',
      // The watch reports every 5 minutes, poller or not: no data means the watch cannot read
      // the source (or stopped), which is itself worth an alarm.
      treatMissingData: 'breaching',
    }).cfnOptions.condition = capturesChanges;
    alarm('PollerStoppedAlarm', {
      alarmDescription: Fn.sub(
        'pgshift ${TaskName}: the CDC poller reported no poll for 15 minutes while its schedule is enabled',
      ),
      namespace: 'pgshift',
      metricName: 'CDCIncomingChanges',
      dimensions: [{ name: 'Task', value: taskName.valueAsString }],
      statistic: 'SampleCount',
      period: 300,
      evaluationPeriods: 3,
      threshold: 1,
      comparisonOperator: 'LessThanThreshold',
      treatMissingData: 'breaching',
    }).cfnOptions.condition = pollerEnabled;
    const executions = (id: string, metricName: string): cloudwatch.CfnAlarm.MetricDataQueryProperty => ({
      id,
      returnData: false,
      metricStat: {
        metric: {
          namespace: 'AWS/States',
          metricName,
          dimensions: [{ name: 'StateMachineArn', value: machine.ref }],
        },
        period: 300,
        stat: 'Sum',
      },
    });
    alarm('FullLoadFailedAlarm', {
      alarmDescription: Fn.sub('pgshift ${TaskName}: a full-load execution failed, timed out or was aborted'),
      metrics: [
        { id: 'failed', expression: 'failures + timeouts + aborts', label: 'unsuccessful full-load executions' },
        executions('failures', 'ExecutionsFailed'),
        executions('timeouts', 'ExecutionsTimedOut'),
        executions('aborts', 'ExecutionsAborted'),
      ],
      evaluationPeriods: 1,
      threshold: 0,
      comparisonOperator: 'GreaterThanThreshold',
      treatMissingData: 'notBreaching',
    });
    alarm('PollerFailuresAlarm', {
      alarmDescription: Fn.sub(
        'pgshift ${TaskName}: scheduled CDC polls failed (messages in the dead-letter queue)',
      ),
      namespace: 'AWS/SQS',
      metricName: 'ApproximateNumberOfMessagesVisible',
      dimensions: [{ name: 'QueueName', value: dlq.attrQueueName }],
      statistic: 'Maximum',
      period: 300,
      evaluationPeriods: 1,
      threshold: 0,
      comparisonOperator: 'GreaterThanThreshold',
      treatMissingData: 'notBreaching',
    });

    alarm('ApplyFailuresAlarm', {
      alarmDescription: Fn.sub('pgshift ${TaskName}: apply gave up on messages (in the apply dead-letter queue)'),
      namespace: 'AWS/SQS',
      metricName: 'ApproximateNumberOfMessagesVisible',
      dimensions: [{ name: 'QueueName', value: applyDlq.attrQueueName }],
      statistic: 'Maximum',
      period: 300,
      evaluationPeriods: 1,
      threshold: 0,
      comparisonOperator: 'GreaterThanThreshold',
      treatMissingData: 'notBreaching',
    }).cfnOptions.condition = hasTarget;
    alarm('ApplyLagAlarm', {
      alarmDescription: Fn.sub(
        "pgshift ${TaskName}: the target is behind (the apply queue's oldest message is older than ${ApplyLagAlarmSeconds} s)",
      ),
      namespace: 'AWS/SQS',
      metricName: 'ApproximateAgeOfOldestMessage',
      dimensions: [{ name: 'QueueName', value: applyQueue.attrQueueName }],
      statistic: 'Maximum',
      period: 300,
      evaluationPeriods: 1,
      threshold: applyLagAlarm.valueAsNumber,
      comparisonOperator: 'GreaterThanThreshold',
      treatMissingData: 'notBreaching',
    }).cfnOptions.condition = hasTarget;

    // ------------------------------------------------------------------ outputs
    const output = (id: string, value: string, description?: string) =>
      new CfnOutput(this, id, { value, description });
    output('StageBucketName', bucket.ref, 'The staging bucket.');
    output('StageUri', Fn.sub('s3://${StageBucket}/${TaskName}'), "Where the task's files are staged (pgshift --stage).");
    output('StateTableName', table.ref, 'The state table (pgshift --state dynamodb://<name>).');
    output('FullLoadStateMachineArn', Fn.ref('FullLoadStateMachine'), 'Start an execution with {} to run the full load.');
    output('TestEndpointFunctionName', Fn.ref('TestEndpointFunction'), 'Invoke with {} to test the source.');
    output('FullLoadFunctionName', fullLoad.ref);
    output('CdcPollerFunctionName', poller.ref);
    output('PollerDeadLetterQueueUrl', dlq.ref, 'Failed scheduled polls.');
    output(
      'SlotName',
      Fn.conditionIf(
        nativeStart.logicalId,
        nativeSlot.valueAsString,
        Fn.join('_', Fn.split('-', Fn.sub('pgshift_${TaskName}'))),
      ).toString(),
      "The logical replication slot on the source (pgshift's own, dropped by teardown; or the user's, with a native start).",
    );
    new CfnOutput(this, 'ApplyFunctionName', { value: applyFn.ref, condition: hasTarget });
    new CfnOutput(this, 'ApplyQueueUrl', {
      value: applyQueue.ref,
      description: "The apply function's queue (the task's events).",
      condition: hasTarget,
    });
  }
}

/** Staged data and checkpoints outlive the stack (see infra/README.md, "Tear down"). */
function retain(resource: CfnResource) {
  resource.cfnOptions.deletionPolicy = CfnDeletionPolicy.RETAIN;
  resource.cfnOptions.updateReplacePolicy = CfnDeletionPolicy.RETAIN;
}
