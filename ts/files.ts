import { closeSync, fsyncSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';

/**
 * Writes `path` so that a reader (or a crash) sees either the old file or the whole new one, never a torn one:
 * the bytes go to a temporary file in the same directory (rename is only atomic within a file system), are
 * fsynced, then renamed over `path`; the directory is fsynced so the rename itself survives a power loss.
 */
export function writeFileAtomic(path: string, data: Uint8Array | string): void {
  replaceFileAtomic(path, (temp) => {
    const fd = openSync(temp, 'w');
    try {
      const bytes = typeof data === 'string' ? Buffer.from(data) : data;
      for (let written = 0; written < bytes.length; ) written += writeSync(fd, bytes, written);
    } finally {
      closeSync(fd);
    }
  });
}

/** As `writeFileAtomic`, for a file that `write` creates at the temporary path it is given (e.g. the engine). */
export function replaceFileAtomic(path: string, write: (tempPath: string) => void): void {
  const temp = `${path}.tmp-${process.pid}`;
  try {
    write(temp);
    const fd = openSync(temp, 'r+');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(temp, path);
  } catch (err) {
    rmSync(temp, { force: true });
    throw err;
  }
  fsyncDirectory(dirname(path));
}

/** Makes the renames and removals in `dir` survive a power loss. */
export function fsyncDirectory(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
