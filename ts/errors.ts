/**
 * A mistake the user can fix (bad config, missing data, unreadable checkpoint). Its message is one line that
 * names the problem and the fix, so the CLI prints it as-is, without a stack trace.
 */
export class UserError extends Error {
  override name = 'UserError';
}

/** How the README has users run the CLI: the spelling of the commands that messages quote. */
export const cliCommand = 'npx nanogpt-rs';

/** `arg` as one word of a shell command, quoted where it needs to be. */
export function shellWord(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", `'\\''`)}'`;
}

/** The first line of an error from elsewhere (the engine, the file system), for embedding in a one-line message. */
export function firstLine(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return message.split('\n')[0].trim();
}

/**
 * Runs `action`, whose failures the engine explains in its first line (not built, no CUDA, a bad shape, a setting
 * it does not have): any error but a UserError becomes one, `what` and that line, so that the CLI prints one line.
 * `outOfMemoryFix` is added to a failure that says the device ran out of memory.
 */
export function explainedByEngine<T>(what: string, action: () => T, outOfMemoryFix?: string): T {
  try {
    return action();
  } catch (err) {
    if (err instanceof UserError) throw err;
    const line = firstLine(err);
    const fix = outOfMemoryFix && /out of memory/i.test(line) ? `; ${outOfMemoryFix}` : '';
    throw new UserError(`${what}: ${line}${fix}`);
  }
}
