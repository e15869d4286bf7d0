#!/usr/bin/env node
// The CLI is written in TypeScript and run through tsx, which also loads the TypeScript config files.
import { register } from 'tsx/esm/api';

register();
await import('../ts/cli.ts');
