// Send one email through Postlane from TypeScript, with nothing but @temporalio/client.
//
//   node dist/send.js --key verify-bob-1 --from agent@acme.test --to bob@example.test \
//       --subject Code --text 847291 [--priority high] [--send-at 2030-01-01T09:00:00Z] [--wait]
//   node dist/send.js --key K --input '{"email": {...}}' [--wait]   # any SendEmailInput as JSON
//
// The contract (docs/contract.md): start workflow type "SendEmail" on task queue "postlane"
// with ID "email:<key>" and one SendEmailInput argument. The workers pick the lane, its
// retry policy and its caps; the workflow sets its own search attributes and memo.
// Prints one JSON line: the started workflow, or with --wait how it ended.
import { parseArgs } from 'node:util';
import { ApplicationFailure, Client, Connection, WorkflowFailedError } from '@temporalio/client';

/** The fields a caller chooses (`postlane schema` prints the full JSON Schema). */
interface SendEmailInput {
  email: {
    sender: string;
    to: string[];
    subject: string;
    text?: string;
    html?: string;
    cc?: string[];
    bcc?: string[];
    tags?: string[];
  };
  key?: string; // defaults to the key in the workflow ID
  lane?: string; // defaults to the lane serving the sender (checked by the workers)
  priority?: 'high' | 'normal' | 'bulk';
  send_at?: string; // ISO 8601 with a time zone
}

async function main(): Promise<void> {
  const { values: o } = parseArgs({
    options: {
      key: { type: 'string' },
      from: { type: 'string' },
      to: { type: 'string', multiple: true },
      subject: { type: 'string' },
      text: { type: 'string' },
      lane: { type: 'string' },
      priority: { type: 'string' },
      'send-at': { type: 'string' },
      input: { type: 'string' },
      wait: { type: 'boolean', default: false },
    },
  });
  if (!o.key) throw new Error('--key is required (the idempotency key)');
  const input: SendEmailInput = o.input
    ? JSON.parse(o.input)
    : {
        email: { sender: o.from ?? '', to: o.to ?? [], subject: o.subject ?? '', text: o.text },
        ...(o.lane && { lane: o.lane }),
        ...(o.priority && { priority: o.priority as SendEmailInput['priority'] }),
        ...(o['send-at'] && { send_at: o['send-at'] }),
      };

  const connection = await Connection.connect({
    address: process.env.TEMPORAL_ADDRESS ?? 'localhost:7233',
  });
  try {
    const client = new Client({
      connection,
      namespace: process.env.TEMPORAL_NAMESPACE ?? 'postlane',
    });
    const handle = await client.workflow.start('SendEmail', {
      taskQueue: 'postlane',
      workflowId: `email:${o.key}`,
      args: [input],
      // The key is the idempotency key: never a second email for it, even once finished.
      workflowIdReusePolicy: 'REJECT_DUPLICATE',
      workflowIdConflictPolicy: 'USE_EXISTING',
    });
    const started = { workflowId: handle.workflowId, runId: handle.firstExecutionRunId };
    if (!o.wait) {
      console.log(JSON.stringify({ status: 'started', ...started }));
      return;
    }
    try {
      const receipt = await handle.result();
      console.log(JSON.stringify({ status: 'sent', ...started, receipt }));
    } catch (err) {
      if (!(err instanceof WorkflowFailedError)) throw err;
      // InvalidEmail, UnknownSender, UnknownLane, SmtpPermanentError, ...
      const cause = err.cause instanceof ApplicationFailure ? err.cause : undefined;
      const type = cause?.type ?? err.cause?.name;
      const message = err.cause?.message;
      console.log(JSON.stringify({ status: 'failed', ...started, type, message }));
    }
  } finally {
    await connection.close();
  }
}

main().catch((err) => {
  console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
