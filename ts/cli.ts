// `nanogpt-rs`: prepare a dataset, train, sample, export. Config arguments are passed through untouched to the
// configurator, so they read exactly like nanoGPT's (`train configs/x.ts --batch_size=32`).
import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { describeKeys, parseArgs, sampleSchema, trainSchema } from './config.ts';
import { prepare } from './data.ts';
import { UserError } from './errors.ts';
import { exportHf, type ExportOptions } from './export.ts';
import { sample } from './sample.ts';
import { train } from './train.ts';

const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };

const program = new Command('nanogpt-rs')
  .description("nanoGPT's recipes on a Rust (candle) engine")
  .version(version);

program
  .command('prepare')
  .description('download (if needed) and tokenize a dataset into <data_dir>/<dataset>/{train,val}.bin')
  .argument('<dataset>', 'dataset to prepare: shakespeare_char (characters) or shakespeare (GPT-2 BPE)')
  .option('--data_dir <dir>', 'folder holding the datasets', 'data')
  .action(async (dataset: string, options: { data_dir: string }) => {
    await prepare(dataset, { dataDir: options.data_dir });
  });

program
  .command('train')
  .description('train a GPT (nanoGPT train.py)')
  .argument('[config_and_overrides...]', 'config files (configs/*.ts) and --key=value overrides, applied left to right')
  .allowUnknownOption()
  .addHelpText('after', `\nConfig keys (defaults train GPT-2 124M on OpenWebText):\n${describeKeys(trainSchema)}`)
  .action(async (args: string[]) => {
    await train(await parseArgs(trainSchema, args));
  });

program
  .command('sample')
  .description('generate text from a trained checkpoint (nanoGPT sample.py)')
  .argument('[config_and_overrides...]', 'config files and --key=value overrides, applied left to right')
  .allowUnknownOption()
  .addHelpText('after', `\nConfig keys:\n${describeKeys(sampleSchema)}`)
  .action(async (args: string[]) => {
    await sample(await parseArgs(sampleSchema, args));
  });

program
  .command('export')
  .description('write a checkpoint as a Hugging Face GPT-2 folder (config.json + model.safetensors)')
  .requiredOption('--out_dir <dir>', 'checkpoint directory')
  .requiredOption('--to <dir>', 'folder to write the Hugging Face model into')
  .action((options: ExportOptions) => {
    exportHf(options);
  });

try {
  await program.parseAsync();
} catch (err) {
  // Mistakes the user can fix get one line; anything else is a bug, where the stack trace helps.
  if (!(err instanceof UserError)) throw err;
  console.error(`error: ${err.message}`);
  process.exitCode = 1;
}
