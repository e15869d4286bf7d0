/**
 * A mistake the user can fix (bad config, missing data, unreadable checkpoint). Its message is one line that
 * names the problem and the fix, so the CLI prints it as-is, without a stack trace.
 */
export class UserError extends Error {
  override name = 'UserError';
}

/** The first line of an error from elsewhere (the engine, the file system), for embedding in a one-line message. */
export function firstLine(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return message.split('\n')[0].trim();
}
