// Entry point for plain-JavaScript users of the library API: the sources are TypeScript, run through tsx.
import { register } from 'tsx/esm/api';

register();
const api = await import('./ts/index.ts');
export const { train, sample, prepare, prepareCorpus, prepareOpenWebText, exportHf, plot, Engine, UserError } = api;
