// `nanogpt-rs`: prepare a dataset, train, sample, export. Config arguments are passed through untouched to the
// configurator, so they read exactly like nanoGPT's (`train configs/x.ts --batch_size=32`).
// Each command imports its module when it runs, so that `--help` starts at once. The library functions print
// nothing; the printing is done here.
import { readFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import { benchDefaults, defaultSplitSeed, defaultValFraction, describeKeys, parseArgs, resolveConfig, sampleSchema, trainSchema } from './config.ts';
import { engineChoices } from './engine.ts';
import { cliCommand, UserError } from './errors.ts';
import { launchRanks } from './ranks.ts';
import type { ExportOptions } from './export.ts';

const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };

const program = new Command('nanogpt-rs')
  .description("nanoGPT's recipes on a Rust (candle) engine")
  .version(version);

program
  .command('prepare')
  .description('download (if needed) and tokenize a dataset into <data_dir>/<dataset>/{train,val}.bin')
  .argument('<dataset>', 'shakespeare_char (characters), shakespeare (GPT-2 BPE), openwebtext, or text (your own files)')
  .argument('[files...]', 'for `text`: the .txt/.jsonl/.parquet files of the corpus, in order')
  .option('--data_dir <dir>', 'folder holding the datasets', 'data')
  .option('--input <dir>', 'openwebtext: folder of its parquet/jsonl/txt files (default <data_dir>/openwebtext/source)')
  .option('--name <name>', 'text: the dataset name, written to <data_dir>/<name>/')
  .option('--tokenizer <kind>', 'text: gpt2 (BPE, <|endoftext|> after each document) or char', 'gpt2')
  .option('--workers <n>', 'openwebtext/text: tokenising threads (default: all cores)', positiveInt)
  .option('--val_fraction <f>', 'openwebtext/text: fraction of documents for val', Number, defaultValFraction)
  .option('--seed <n>', 'openwebtext/text: seed of the train/val split', positiveInt, defaultSplitSeed)
  .action(async (dataset: string, files: string[], options: PrepareCliOptions) => {
    const { prepareCorpus, prepareOpenWebText } = await import('./corpus.ts');
    const corpus = { dataDir: options.data_dir, workers: options.workers, valFraction: options.val_fraction, seed: options.seed, log: console.log, progressStream: process.stdout };
    if (dataset === 'openwebtext') {
      await prepareOpenWebText({ ...corpus, inputDir: options.input });
    } else if (dataset === 'text') {
      if (!options.name) throw new UserError(`prepare text needs --name=NAME (the folder under data_dir to write): ${cliCommand} prepare text --name=NAME FILE...`);
      if (files.length === 0) throw new UserError(`prepare text needs the corpus files: ${cliCommand} prepare text --name=NAME FILE...`);
      if (options.tokenizer !== 'gpt2' && options.tokenizer !== 'char') {
        throw new UserError(`--tokenizer must be gpt2 or char, got '${options.tokenizer}'`);
      }
      await prepareCorpus({ ...corpus, name: options.name, files, tokenizer: options.tokenizer });
    } else {
      const { prepare, preparableDatasets } = await import('./data.ts');
      if (!preparableDatasets.includes(dataset)) {
        const known = [...preparableDatasets, 'openwebtext', `text (your own files: ${cliCommand} prepare text --name=NAME FILE...)`];
        throw new UserError(`cannot prepare dataset '${dataset}'; available: ${known.join(', ')}`);
      }
      await prepare(dataset, { dataDir: options.data_dir, log: console.log });
    }
  });

interface PrepareCliOptions {
  data_dir: string;
  input?: string;
  name?: string;
  tokenizer: string;
  workers?: number;
  val_fraction: number;
  seed: number;
}

function port(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n > 65535) throw new UserError(`--port expects a port number from 0 to 65535 (0 picks a free one), got '${value}'`);
  return n;
}

function trueOrFalse(key: string, value: string): boolean {
  if (/^(true|1)$/i.test(value)) return true;
  if (/^(false|0)$/i.test(value)) return false;
  throw new UserError(`--${key} expects True or False, got '${value}'`);
}

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new UserError(`expected a positive integer, got '${value}'`);
  return n;
}

program
  .command('train')
  .description('train a GPT (nanoGPT train.py)')
  .argument('[config_and_overrides...]', 'config files (configs/*.ts) and --key=value overrides, applied left to right')
  .allowUnknownOption()
  .addHelpText('after', `\nConfig keys (defaults train GPT-2 124M on OpenWebText):\n${describeKeys(trainSchema)}`)
  .action(async (args: string[]) => {
    // torchrun's flags: the ranks of a data-parallel run, each running this command without them.
    const { launchTraining, takeLaunchFlags } = await import('./launch-ranks.ts');
    const { flags, rest } = takeLaunchFlags(args);
    // The ranks print the overrides, rank 0 alone (the launcher leaves it to them).
    const quiet = (flags?.worldSize ?? 1) > 1 || launchRanks().rank !== 0;
    const overrides = await parseArgs(trainSchema, rest, quiet ? () => {} : undefined);
    if (flags && flags.worldSize > 1) {
      process.exitCode = await launchTraining(flags, rest, resolveConfig(trainSchema, overrides));
      return;
    }
    const { runTrainCommand } = await import('./train-command.ts');
    await runTrainCommand(overrides);
  });

program
  .command('sample')
  .description('generate text from a trained checkpoint (nanoGPT sample.py)')
  .argument('[config_and_overrides...]', 'config files and --key=value overrides, applied left to right')
  .allowUnknownOption()
  .addHelpText('after', `\nConfig keys:\n${describeKeys(sampleSchema)}`)
  .action(async (args: string[]) => {
    // Each sample followed by a line of dashes, as sample.py prints them. The samples decode together: the first is
    // printed as it is generated, the others once they are complete.
    const { generate } = await import('./sample.ts');
    const texts: string[] = [];
    for await (const { sample, text } of generate(await parseArgs(sampleSchema, args), { onLog: console.log })) {
      if (sample === 0) process.stdout.write(text);
      texts[sample] = (texts[sample] ?? '') + text;
    }
    for (const [k, text] of texts.entries()) process.stdout.write(`${k === 0 ? '' : text}\n---------------\n`);
  });

program
  .command('bench')
  .description("time training steps like nanoGPT's bench.py: ms/iter, tokens/s, MFU, peak memory (GPT-2 124M, bf16, cuda by default)")
  .argument('[overrides...]', `--key=value overrides of: ${Object.keys(benchDefaults).join(', ')}`)
  .allowUnknownOption()
  .action(async (args: string[]) => {
    const { parseBenchArgs, runBench } = await import('./bench.ts');
    const options = parseBenchArgs(args);
    console.log(`bench: ${JSON.stringify({ ...benchDefaults, ...options })}`);
    console.log(`RESULT ${JSON.stringify(runBench(options))}`);
  });

program
  .command('export')
  .description("write a checkpoint as a Hugging Face GPT-2 folder (config.json + model.safetensors), or as nanoGPT's ckpt.pt")
  .requiredOption('--out_dir <dir>', 'checkpoint directory (ours, or nanoGPT\'s holding ckpt.pt)')
  .requiredOption('--to <dir>', "folder to write the Hugging Face model into, or `nanogpt` for nanoGPT's ckpt.pt")
  .option('--out <file>', 'with --to=nanogpt: the ckpt.pt to write')
  .addOption(new Option('--engine <engine>', 'engine build that converts the weights').choices(engineChoices).default('auto'))
  .action(async (options: ExportOptions) => {
    const { exportHf } = await import('./export.ts');
    exportHf({ ...options, log: console.log });
  });

program
  .command('plot')
  .description("render a run's loss, learning-rate and gradient-norm curves (out_dir/log.jsonl) as an HTML page")
  .requiredOption('--out_dir <dir>', 'the run to plot')
  .option('--to <file>', 'where to write the page (default: <out_dir>/plot.html)')
  .action(async (options: { out_dir: string; to?: string }) => {
    const { plot } = await import('./plot.ts');
    console.log(`wrote ${plot(options.out_dir, options.to)}`);
  });

program
  .command('serve')
  .description('serve the page that trains a GPT in a browser tab (web/), cross-origin isolated for threads')
  .option('--host <host>', 'address to listen on', '127.0.0.1')
  .option('--port <n>', 'port (0 picks a free one)', port, 8000)
  .option('--isolated <bool>', 'send COOP/COEP headers (False: the page trains on one thread)', (value: string) => trueOrFalse('isolated', value), true)
  .action(async (options: { host: string; port: number; isolated: boolean }) => {
    const { serve } = await import('./serve.ts');
    const { url } = await serve(options);
    console.log(`serving the training page at ${url}`);
  });

try {
  await program.parseAsync();
} catch (err) {
  // Mistakes the user can fix get one line; anything else is a bug, where the stack trace helps.
  if (!(err instanceof UserError)) throw err;
  // Each rank of a data-parallel run says which it is: mpirun interleaves their output.
  console.error(`error${rankLabel()}: ${err.message}`);
  process.exitCode = 1;
}

/** ` (rank N)` in a process that is one of several ranks, else nothing. */
function rankLabel(): string {
  try {
    const { rank, worldSize } = launchRanks();
    return worldSize > 1 ? ` (rank ${rank})` : '';
  } catch {
    return '';
  }
}
