// The library API: the CLI's commands as functions, plus the engine itself for custom loops.
export { train, type TrainResult, type TrainOptions, type TrainLogEvent } from './train.ts';
export { sample, generate, type SampleOptions, type TextChunk } from './sample.ts';
export { prepare, type PrepareOptions, type PrepareResult } from './data.ts';
export { exportHf, type ExportOptions } from './export.ts';
export { prepareCorpus, prepareOpenWebText, type CorpusOptions, type CorpusResult } from './corpus.ts';
export { plot } from './plot.ts';
export { Engine, estimateMemory, type MemoryEstimate, type ModelArgs, type OptimizerArgs, type LrSchedule, type ParamGroups, type StepStats } from './engine.ts';
export type { TrainConfig, SampleConfig } from './config.ts';
export { UserError } from './errors.ts';
